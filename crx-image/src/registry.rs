//! Talking to an OCI distribution registry through `oci-client`: reference parsing with
//! mirrors, HTTPS (system roots) or HTTP for insecure registries, auth, manifest resolution
//! to linux/amd64, and blob streams.

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    OciImageManifest, OciManifest, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::{Digest, Error, RegistryConfig};

const ACCEPTED: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Parse a user-supplied reference into its canonical form (`docker.io/library/x:latest`).
pub fn parse_reference(reference: &str) -> Result<Reference, Error> {
    reference
        .parse::<Reference>()
        .map_err(|e| Error::InvalidReference {
            reference: reference.to_owned(),
            reason: e.to_string(),
        })
}

/// The canonical name (`docker.io/library/x:latest`) of a user-supplied reference. A Docker
/// Hub short name (`busybox`, `busybox:1.36`) is canonicalised without [`parse_reference`],
/// whose grammar is a large regex: compiling it costs a one-shot `crx run` more than the rest
/// of its image lookup (~0.6 s in the emulated test host).
pub fn canonical_name(reference: &str) -> Result<String, Error> {
    match docker_hub_short_name(reference) {
        Some(name) => Ok(name),
        None => parse_reference(reference).map(|r| r.whole()),
    }
}

/// `docker.io/library/NAME:TAG` for `NAME[:TAG]` in a subset of the reference grammar: NAME
/// lower-case alphanumeric runs joined by single `.`, `_` or `-`, TAG
/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` (`latest` when absent). None for anything else, which the
/// full parser then decides.
fn docker_hub_short_name(reference: &str) -> Option<String> {
    let (name, tag) = reference.split_once(':').unwrap_or((reference, "latest"));
    let name_ok = name.split(['.', '_', '-']).all(|run| {
        !run.is_empty()
            && run
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    let tag_ok = tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    (name_ok && tag_ok).then(|| format!("docker.io/library/{name}:{tag}"))
}

/// A manifest chosen for linux/amd64, with its raw bytes (stored as blobs).
pub(crate) struct ResolvedManifest {
    pub manifest: OciImageManifest,
    pub raw: Bytes,
    pub digest: Digest,
    /// The index it was chosen from: raw bytes and digest.
    pub index: Option<(Bytes, Digest)>,
}

/// Pick the linux/amd64 entry of an index (shared by pulls and imports).
pub(crate) fn select_platform(
    index: &oci_client::manifest::OciImageIndex,
    what: &str,
) -> Result<Digest, Error> {
    let d = linux_amd64_resolver(&index.manifests)
        .ok_or_else(|| Error::Unsupported(format!("{what} has no linux/amd64 image")))?;
    Digest::parse(&d)
}

/// One image reference at one registry endpoint.
pub(crate) struct Remote {
    client: Client,
    /// The reference as fetched (mirror applied).
    fetch: Reference,
    auth: RegistryAuth,
    /// Display name for errors.
    name: String,
}

impl Remote {
    pub(crate) fn new(cfg: &RegistryConfig, name: &Reference) -> Result<Self, Error> {
        let endpoint = cfg.endpoint(name.registry()).to_owned();
        let fetch = match name.digest() {
            Some(d) => {
                Reference::with_digest(endpoint.clone(), name.repository().to_owned(), d.to_owned())
            }
            None => Reference::with_tag(
                endpoint.clone(),
                name.repository().to_owned(),
                name.tag().unwrap_or("latest").to_owned(),
            ),
        };
        let protocol = if cfg.is_insecure(&endpoint) {
            ClientProtocol::HttpsExcept(vec![fetch.resolve_registry().to_owned()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        });
        let auth = cfg.auth_for(name.registry())?;
        Ok(Remote {
            client,
            fetch,
            auth,
            name: name.whole(),
        })
    }

    fn err(&self, source: OciDistributionError) -> Error {
        let registry = self.fetch.resolve_registry().to_owned();
        let reference = self.name.clone();
        let denied = match &source {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => true,
            OciDistributionError::RegistryError { envelope, .. } => envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)),
            _ => false,
        };
        let missing = match &source {
            OciDistributionError::ImageManifestNotFoundError(_) => true,
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
                    )
                })
            }
            OciDistributionError::ServerError { code, .. } => *code == 404,
            _ => false,
        };
        if denied {
            Error::Unauthorized {
                registry,
                reference,
                source,
            }
        } else if missing {
            Error::NotInRegistry {
                registry,
                reference,
                source,
            }
        } else {
            Error::Registry {
                registry,
                reference,
                source,
            }
        }
    }

    async fn raw(&self, reference: &Reference) -> Result<(Bytes, Digest, OciManifest), Error> {
        let (raw, digest) = self
            .client
            .pull_manifest_raw(reference, &self.auth, ACCEPTED)
            .await
            .map_err(|e| self.err(e))?;
        let digest = Digest::parse(&digest)?;
        if Digest::of(&raw) != digest {
            return Err(Error::Malformed {
                what: format!("manifest {digest}"),
                reason: "content does not match its digest".into(),
            });
        }
        let manifest = serde_json::from_slice(&raw).map_err(|e| Error::Malformed {
            what: format!("manifest {digest}"),
            reason: e.to_string(),
        })?;
        Ok((raw, digest, manifest))
    }

    /// Fetch the manifest, following an index to its linux/amd64 image.
    pub(crate) async fn manifest(&self) -> Result<ResolvedManifest, Error> {
        match self.raw(&self.fetch).await? {
            (raw, digest, OciManifest::Image(manifest)) => Ok(ResolvedManifest {
                manifest,
                raw,
                digest,
                index: None,
            }),
            (index_raw, index_digest, OciManifest::ImageIndex(index)) => {
                let chosen = select_platform(&index, &self.name)?;
                match self
                    .raw(&self.fetch.clone_with_digest(chosen.to_string()))
                    .await?
                {
                    (raw, digest, OciManifest::Image(manifest)) => Ok(ResolvedManifest {
                        manifest,
                        raw,
                        digest,
                        index: Some((index_raw, index_digest)),
                    }),
                    (_, digest, OciManifest::ImageIndex(_)) => Err(Error::Unsupported(format!(
                        "nested index {digest} in {}",
                        self.name
                    ))),
                }
            }
        }
    }

    /// Stream blob `digest` (bytes are verified by the store, not trusted here).
    pub(crate) async fn blob(
        &self,
        digest: &Digest,
    ) -> Result<impl Stream<Item = Result<Bytes, Error>> + Unpin + use<>, Error> {
        let sized = self
            .client
            .pull_blob_stream(&self.fetch, digest.as_str())
            .await
            .map_err(|e| self.err(e))?;
        let name = self.name.clone();
        let registry = self.fetch.resolve_registry().to_owned();
        Ok(sized.stream.map_err(move |e| Error::Registry {
            registry: registry.clone(),
            reference: name.clone(),
            source: OciDistributionError::IoError(e),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `reference` takes the fast path (or not, as `short`), and its canonical name is the
    /// reference parser's, or both refuse it.
    fn agrees_with_the_parser(reference: &str, short: bool) {
        assert_eq!(
            docker_hub_short_name(reference).is_some(),
            short,
            "{reference}"
        );
        assert_eq!(
            canonical_name(reference).ok(),
            parse_reference(reference).ok().map(|r| r.whole()),
            "{reference}"
        );
    }

    #[test]
    fn short_names_canonicalise_as_the_reference_parser_does() {
        for reference in [
            "busybox",
            "busybox:1.36",
            "busybox:latest",
            "pause:3.10",
            "my-app.v2_x:_Tag-1.0",
            "localhost:5000",
            "a:b",
        ] {
            assert!(canonical_name(reference).is_ok(), "{reference}");
            agrees_with_the_parser(reference, true);
        }
    }

    #[test]
    fn other_references_go_to_the_parser() {
        for reference in [
            "library/busybox",
            "127.0.0.1:5000/busybox:1",
            "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a__b",
            "a--b",
            "-a",
            "a.",
            "Busybox",
            "busybox:",
            "busybox:.x",
            "",
        ] {
            agrees_with_the_parser(reference, false);
        }
    }
}
