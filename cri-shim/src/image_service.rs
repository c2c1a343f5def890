//! The CRI ImageService on the crx-image store: PullImage (with the request's credentials),
//! ImageStatus (verbose: the records, rootfs and image config), ListImages (with a filter),
//! RemoveImage (every name of the image, then garbage collection; idempotent) and ImageFsInfo.
//! Store calls block, so they run on the blocking pool; a pull runs as its own task so a
//! caller that gives up (deadline, disconnect) never interrupts it half-way.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use crx_image::{parse_reference, Credential, LogProgress, RegistryConfig, Store};
use k8s_cri::v1 as cri;
use tonic::{Request, Response, Status};

use crate::errors::{image_status, join_status};
use crate::images::{Catalog, Image};

/// The ImageService of one crx-cri instance.
pub struct ImageService {
    store: Store,
    /// How the store reaches registries when a request brings no credentials.
    registry: RegistryConfig,
}

impl ImageService {
    pub fn new(store: Store, registry: RegistryConfig) -> Self {
        ImageService { store, registry }
    }

    /// The store to pull `reference` with: this one, or with `auth` for its registry.
    fn store_for(&self, registry: &str, auth: Option<cri::AuthConfig>) -> Result<Store, Status> {
        let Some(auth) = auth else {
            return Ok(self.store.clone());
        };
        let mut config = self.registry.clone();
        if !auth.registry_token.is_empty() {
            config
                .tokens
                .insert(registry.to_owned(), auth.registry_token);
        } else if !auth.username.is_empty() || !auth.password.is_empty() {
            config.credentials.insert(
                registry.to_owned(),
                Credential {
                    username: auth.username,
                    password: auth.password,
                },
            );
        } else if !auth.auth.is_empty() {
            config
                .credentials
                .insert(registry.to_owned(), decode_auth(&auth.auth)?);
        } else if !auth.identity_token.is_empty() {
            return Err(Status::unimplemented(
                "identity tokens (OAuth2 refresh tokens) are not supported; pass a username and password or a registry token",
            ));
        } else {
            return Ok(self.store.clone());
        }
        Store::open(self.store.root(), config).map_err(image_status)
    }
}

/// `auth` of an AuthConfig: base64 of `username:password`.
fn decode_auth(auth: &str) -> Result<Credential, Status> {
    let bad = |why: &str| Status::invalid_argument(format!("auth config: {why}"));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| bad("`auth` is not base64"))?;
    let raw = String::from_utf8(raw).map_err(|_| bad("`auth` is not UTF-8"))?;
    let (username, password) = raw
        .split_once(':')
        .ok_or_else(|| bad("`auth` is not base64 of username:password"))?;
    Ok(Credential {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// The image reference of a request; empty is refused.
fn reference(spec: Option<cri::ImageSpec>) -> Result<String, Status> {
    match spec {
        Some(s) if !s.image.is_empty() => Ok(s.image),
        _ => Err(Status::invalid_argument(
            "no image given (ImageSpec.image is empty)",
        )),
    }
}

/// Run blocking store work on the blocking pool.
async fn blocking<T, F>(work: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Status> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(join_status)?
}

/// The CRI message of `image`, with its user read from its config.
fn cri_image(store: &Store, image: &Image) -> Result<cri::Image, Status> {
    let run = store.run_config(image.record()).map_err(image_status)?;
    Ok(image.to_cri(&run.user))
}

/// ImageStatus' verbose `info`: the image's records, its root filesystem and its config.
fn verbose_info(store: &Store, image: &Image) -> Result<HashMap<String, String>, Status> {
    let record = image.record();
    let config = store.image_config(record).map_err(image_status)?;
    let spec: serde_json::Value = serde_json::from_slice(&config)
        .map_err(|e| Status::internal(format!("image config {}: {e}", record.config)))?;
    let info = serde_json::json!({
        "id": image.id,
        "records": image.records,
        "chainID": record.top_chain(),
        "rootfs": store.rootfs(record),
        "imageSpec": spec,
    });
    Ok(HashMap::from([("info".to_owned(), info.to_string())]))
}

#[tonic::async_trait]
impl cri::image_service_server::ImageService for ImageService {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let store = self.store.clone();
        let images = blocking(move || {
            let catalog = Catalog::load(&store).map_err(image_status)?;
            let chosen: Vec<&Image> = match &filter {
                Some(f) => catalog.filter(f),
                None => catalog.images().iter().collect(),
            };
            chosen.into_iter().map(|i| cri_image(&store, i)).collect()
        })
        .await?;
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = reference(request.image)?;
        let store = self.store.clone();
        let response = blocking(move || {
            let catalog = Catalog::load(&store).map_err(image_status)?;
            let Some(image) = catalog.find(&name) else {
                return Ok(cri::ImageStatusResponse::default());
            };
            Ok(cri::ImageStatusResponse {
                image: Some(cri_image(&store, image)?),
                info: if request.verbose {
                    verbose_info(&store, image)?
                } else {
                    HashMap::new()
                },
            })
        })
        .await?;
        Ok(Response::new(response))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = reference(request.image)?;
        let parsed = parse_reference(&name).map_err(image_status)?;
        let store = self.store_for(parsed.registry(), request.auth)?;
        let pull = tokio::spawn(async move { store.pull(&name, &LogProgress).await });
        let record = pull.await.map_err(join_status)?.map_err(image_status)?;
        tracing::info!(image = %record.name, id = %record.config, "image pulled");
        Ok(Response::new(cri::PullImageResponse {
            image_ref: record.config.to_string(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let name = reference(request.into_inner().image)?;
        let store = self.store.clone();
        blocking(move || {
            let catalog = Catalog::load(&store).map_err(image_status)?;
            let Some(image) = catalog.find(&name) else {
                return Ok(()); // already gone
            };
            for record in &image.records {
                match store.remove(&record.name) {
                    Ok(_) | Err(crx_image::Error::ImageNotFound(_)) => {}
                    Err(e) => return Err(image_status(e)),
                }
            }
            tracing::info!(id = %image.id, names = ?image.repo_tags(), "image removed");
            match store.gc() {
                Ok(report) => tracing::info!(
                    blobs = report.blobs_removed.len(),
                    layers = report.layers_removed.len(),
                    bytes = report.bytes_freed,
                    "unused image content collected"
                ),
                // The image is gone; its content waits for the next collection.
                Err(e) => tracing::warn!("garbage collection after removing {name}: {e}"),
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let store = self.store.clone();
        let usage = blocking(move || store.fs_usage().map_err(image_status)).await?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![cri::FilesystemUsage {
                timestamp,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: self.store.root().display().to_string(),
                }),
                used_bytes: Some(cri::UInt64Value {
                    value: usage.used_bytes,
                }),
                inodes_used: Some(cri::UInt64Value {
                    value: usage.inodes_used,
                }),
            }],
            // Containers write inside their pod VM, not on a host filesystem.
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_field_is_base64_user_password() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        let c = decode_auth(&b64).unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3:cret")
        );
        for bad in [
            "%%%",
            &base64::engine::general_purpose::STANDARD.encode("nocolon"),
        ] {
            assert_eq!(
                decode_auth(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }
}
