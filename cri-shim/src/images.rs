//! The CRI's view of the image store. The store keeps one record per name; the CRI sees one
//! image per image config (its ID is the config digest, as in containerd), carrying every name
//! that points at it as a repo tag (`registry/repo:tag`) and repo digest
//! (`registry/repo@sha256:…`, the digest the name resolved to: the index or the manifest).
//! References resolve like kubelet expects: an ID (`sha256:…`, the bare 64 hex digits, or a
//! unique prefix of at least 12), a tag (normalized: `busybox` is
//! `docker.io/library/busybox:latest`) or a digest reference.

use std::collections::BTreeMap;

use crx_image::{parse_reference, Digest, ImageRecord, Reference, Store};
use k8s_cri::v1 as cri;

/// Shortest ID prefix accepted for an image.
const MIN_ID_PREFIX: usize = 12;

/// One CRI image: all store records with the same config.
#[derive(Debug, Clone)]
pub struct Image {
    /// `sha256:<config hex>`.
    pub id: String,
    /// Every record of it, by name.
    pub records: Vec<ImageRecord>,
}

/// One name of an image, as the CRI shows it.
enum Name {
    /// `registry/repo:tag`, and the repo digest it resolved to.
    Tag { tag: String, digest: String },
    /// `registry/repo@sha256:…` (pulled by digest).
    Digest(String),
}

impl Name {
    fn of(record: &ImageRecord) -> Name {
        let Ok(r) = parse_reference(&record.name) else {
            // Names the store was given by hand: shown as they are.
            return Name::Tag {
                tag: record.name.clone(),
                digest: String::new(),
            };
        };
        let repo = repository(&r);
        match r.digest() {
            Some(d) => Name::Digest(format!("{repo}@{d}")),
            None => Name::Tag {
                tag: record.name.clone(),
                digest: format!(
                    "{repo}@{}",
                    record.index.as_ref().unwrap_or(&record.manifest)
                ),
            },
        }
    }
}

/// `registry/repository` of a reference.
fn repository(r: &Reference) -> String {
    format!("{}/{}", r.registry(), r.repository())
}

impl Image {
    pub fn repo_tags(&self) -> Vec<String> {
        let mut tags: Vec<String> = self
            .records
            .iter()
            .filter_map(|r| match Name::of(r) {
                Name::Tag { tag, .. } => Some(tag),
                Name::Digest(_) => None,
            })
            .collect();
        tags.sort();
        tags.dedup();
        tags
    }

    pub fn repo_digests(&self) -> Vec<String> {
        let mut digests: Vec<String> = self
            .records
            .iter()
            .map(|r| match Name::of(r) {
                Name::Tag { digest, .. } => digest,
                Name::Digest(d) => d,
            })
            .filter(|d| !d.is_empty())
            .collect();
        digests.sort();
        digests.dedup();
        digests
    }

    /// Bytes of its layers as stored (compressed).
    pub fn size(&self) -> u64 {
        self.records
            .iter()
            .map(ImageRecord::size)
            .max()
            .unwrap_or(0)
    }

    /// The record to read the image's content through (all share config and layers).
    pub fn record(&self) -> &ImageRecord {
        &self.records[0]
    }

    /// The CRI message; `user` is the image config's `User`.
    pub fn to_cri(&self, user: &str) -> cri::Image {
        let (uid, username) = image_user(user);
        cri::Image {
            id: self.id.clone(),
            repo_tags: self.repo_tags(),
            repo_digests: self.repo_digests(),
            size: self.size(),
            uid: uid.map(|value| cri::Int64Value { value }),
            username,
            spec: Some(cri::ImageSpec {
                image: self.id.clone(),
                ..Default::default()
            }),
            pinned: false,
        }
    }

    /// Whether `r` names this image: its tag, or its digest (index or manifest) in its
    /// repository.
    fn named_by(&self, r: &Reference) -> bool {
        let repo = repository(r);
        self.records.iter().any(|rec| match r.digest() {
            None => rec.name == r.whole(),
            Some(d) => {
                parse_reference(&rec.name).is_ok_and(|n| repository(&n) == repo)
                    && (rec.manifest.as_str() == d
                        || rec.index.as_ref().is_some_and(|i| i.as_str() == d))
            }
        })
    }

    /// Whether any name of this image is in repository `repo` (`registry/repository`).
    fn in_repository(&self, repo: &str) -> bool {
        self.records
            .iter()
            .any(|rec| parse_reference(&rec.name).is_ok_and(|n| repository(&n) == repo))
    }
}

/// `User` of an image config → (uid, username), as kubelet reads them: a numeric user (with or
/// without a group) is a uid, anything else a username; empty is neither.
fn image_user(user: &str) -> (Option<i64>, String) {
    let user = user.split(':').next().unwrap_or_default();
    if user.is_empty() {
        return (None, String::new());
    }
    match user.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, user.to_owned()),
    }
}

/// Every image of a store, grouped by config.
pub struct Catalog {
    images: Vec<Image>,
}

impl Catalog {
    /// Read the store's records. Blocking.
    pub fn load(store: &Store) -> Result<Catalog, crx_image::Error> {
        Ok(Catalog::of(store.images()?))
    }

    fn of(records: Vec<ImageRecord>) -> Catalog {
        let mut by_config: BTreeMap<Digest, Vec<ImageRecord>> = BTreeMap::new();
        for record in records {
            by_config
                .entry(record.config.clone())
                .or_default()
                .push(record);
        }
        Catalog {
            images: by_config
                .into_iter()
                .map(|(config, records)| Image {
                    id: config.to_string(),
                    records,
                })
                .collect(),
        }
    }

    pub fn images(&self) -> &[Image] {
        &self.images
    }

    /// The image `reference` names: an ID or unique ID prefix, a tag, a digest reference.
    pub fn find(&self, reference: &str) -> Option<&Image> {
        if let Some(hex) = reference.strip_prefix("sha256:") {
            return self.by_id_prefix(hex, 1);
        }
        let by_name = parse_reference(reference)
            .ok()
            .and_then(|r| self.images.iter().find(|i| i.named_by(&r)));
        by_name.or_else(|| self.by_id_prefix(reference, MIN_ID_PREFIX))
    }

    /// The images a ListImages filter selects: a repository without tag or digest selects all
    /// of its images, anything else what [`Catalog::find`] finds.
    pub fn filter(&self, reference: &str) -> Vec<&Image> {
        let last = reference.rsplit('/').next().unwrap_or(reference);
        let bare_repository =
            !reference.starts_with("sha256:") && !reference.contains('@') && !last.contains(':');
        if bare_repository {
            if let Ok(r) = parse_reference(reference) {
                let repo = repository(&r);
                let all: Vec<&Image> = self
                    .images
                    .iter()
                    .filter(|i| i.in_repository(&repo))
                    .collect();
                if !all.is_empty() {
                    return all;
                }
            }
        }
        self.find(reference).into_iter().collect()
    }

    /// The one image whose ID starts with `hex` (at least `min` hex digits).
    fn by_id_prefix(&self, hex: &str, min: usize) -> Option<&Image> {
        if hex.len() < min || hex.len() > 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let hex = hex.to_ascii_lowercase();
        let mut found = self
            .images
            .iter()
            .filter(|i| i.id["sha256:".len()..].starts_with(&hex));
        match (found.next(), found.next()) {
            (Some(i), None) => Some(i),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: u8) -> Digest {
        Digest::of(&[byte])
    }

    fn record(name: &str, config: u8, manifest: u8, index: Option<u8>) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            manifest: digest(manifest),
            index: index.map(digest),
            config: digest(config),
            layers: Vec::new(),
            stored_at: 0,
        }
    }

    #[test]
    fn names_merge_into_one_image_per_config() {
        let c = Catalog::of(vec![
            record("docker.io/library/busybox:latest", 1, 10, None),
            record("reg.example:5000/tags:1", 2, 20, Some(21)),
            record("reg.example:5000/tags:2", 2, 20, Some(21)),
            record(
                &format!("reg.example:5000/tags@{}", digest(20)),
                2,
                20,
                None,
            ),
        ]);
        assert_eq!(c.images().len(), 2);
        let tags = c.find("reg.example:5000/tags:2").unwrap();
        assert_eq!(
            tags.repo_tags(),
            ["reg.example:5000/tags:1", "reg.example:5000/tags:2"]
        );
        let mut digests = [
            format!("reg.example:5000/tags@{}", digest(20)),
            format!("reg.example:5000/tags@{}", digest(21)),
        ];
        digests.sort();
        assert_eq!(tags.repo_digests(), digests);
        // By ID, ID without prefix, ID prefix, each digest, normalized name.
        let id = tags.id.clone();
        for r in [
            id.clone(),
            id["sha256:".len()..].to_owned(),
            id[.."sha256:".len() + 12].to_owned(),
            id["sha256:".len()..][..12].to_owned(),
            format!("reg.example:5000/tags@{}", digest(21)),
            format!("reg.example:5000/tags@{}", digest(20)),
        ] {
            assert_eq!(c.find(&r).map(|i| &i.id), Some(&id), "{r}");
        }
        assert_eq!(
            c.find("busybox").unwrap().repo_tags(),
            ["docker.io/library/busybox:latest"]
        );
        assert!(c.find("reg.example:5000/tags:3").is_none());
        assert!(c
            .find(&format!("other.example/tags@{}", digest(20)))
            .is_none());
        assert!(c.find(&id["sha256:".len()..][..11]).is_none());
        assert_eq!(c.filter("reg.example:5000/tags").len(), 1);
        assert_eq!(c.filter("docker.io/library/busybox").len(), 1);
        assert!(c.filter("reg.example:5000/none").is_empty());
    }

    #[test]
    fn users_become_uid_or_username() {
        assert_eq!(image_user(""), (None, String::new()));
        assert_eq!(image_user("1002"), (Some(1002), String::new()));
        assert_eq!(image_user("1003:1004"), (Some(1003), String::new()));
        assert_eq!(image_user("www-data"), (None, "www-data".into()));
        assert_eq!(image_user("www-data:1004"), (None, "www-data".into()));
    }
}
