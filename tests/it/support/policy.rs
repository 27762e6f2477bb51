//! Policy files in temp dirs, rewritten atomically the way Kubernetes updates mounted ConfigMaps.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use tempfile::TempDir;

const FILE: &str = "policy.yaml";

/// A policy file whose directory lives as long as this value.
pub struct TempPolicy {
    dir: TempDir,
    path: PathBuf,
    configmap: bool,
    generation: AtomicUsize,
}

/// Writes `yaml` to `<tmpdir>/policy.yaml` (a plain file; `rewrite` renames a new file over it).
pub fn write_policy(yaml: &str) -> TempPolicy {
    let policy = TempPolicy::new(false);
    policy.rewrite(yaml);
    policy
}

/// Like [`write_policy`] but with the real ConfigMap volume layout:
/// `policy.yaml -> ..data/policy.yaml`, `..data -> ..<generation>/`; `rewrite` writes a new
/// generation dir and atomically renames a fresh `..data` symlink over the old one.
pub fn write_policy_configmap(yaml: &str) -> TempPolicy {
    let policy = TempPolicy::new(true);
    policy.rewrite(yaml);
    symlink(Path::new("..data").join(FILE), policy.path()).unwrap();
    policy
}

impl TempPolicy {
    fn new(configmap: bool) -> Self {
        let dir = tempfile::tempdir().expect("create policy temp dir");
        let path = dir.path().join(FILE);
        Self {
            dir,
            path,
            configmap,
            generation: AtomicUsize::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Atomically replaces the policy content (readers see the old or the new file, never a mix).
    pub fn rewrite(&self, yaml: &str) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst);
        let dir = self.dir.path();
        if !self.configmap {
            let tmp = dir.join(format!(".{FILE}.{generation}.tmp"));
            fs::write(&tmp, yaml).unwrap();
            fs::rename(&tmp, &self.path).unwrap();
            return;
        }
        let new_gen = format!("..gen{generation}");
        fs::create_dir(dir.join(&new_gen)).unwrap();
        fs::write(dir.join(&new_gen).join(FILE), yaml).unwrap();
        let old_gen = fs::read_link(dir.join("..data")).ok();
        symlink(&new_gen, dir.join("..data_tmp")).unwrap();
        fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if let Some(old) = old_gen {
            fs::remove_dir_all(dir.join(old)).unwrap();
        }
    }
}

impl AsRef<Path> for TempPolicy {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}
