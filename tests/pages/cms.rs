//! The test CMS (tests/wagtail): a real Wagtail from PyPI in an environment our script
//! makes, a site built through Wagtail's own Python API, and Wagtail's own API v2 to
//! compare a replica with.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use cms_mirror::db::Backend;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the test CMS's environment, made (once per machine, pinned versions)
/// by scripts/wagtail-env.sh.
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new(workspace().join("scripts/wagtail-env.sh"))
            .output()
            .expect("run scripts/wagtail-env.sh");
        assert!(
            out.status.success(),
            "scripts/wagtail-env.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// A generated CMS: its database (SQLite file or a fresh PostgreSQL database), its media
/// root, and what the generator says it made.
pub struct Cms {
    pub db_url: String,
    pub media_root: PathBuf,
    pub made: Value,
    _dir: tempfile::TempDir,
}

impl Cms {
    /// Builds the default test site on `backend`.
    pub async fn generate(backend: Backend) -> Cms {
        let dir = tempfile::tempdir().unwrap();
        let db_url = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.path().join("cms.sqlite3").display()),
            Backend::Postgres => crate::postgres::fresh_database().await,
        };
        let media_root = dir.path().join("media");
        let mut cms = Cms {
            db_url,
            media_root,
            made: Value::Null,
            _dir: dir,
        };
        let out = cms.run(&["generate"]);
        cms.made = serde_json::from_str(&out).expect("generator summary");
        cms
    }

    /// Runs cms.py with this CMS's database and media root; its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = Command::new(python())
            .arg(workspace().join("tests/wagtail/cms.py"))
            .args(args)
            .env("CMS_DB", &self.db_url)
            .env("CMS_MEDIA_ROOT", &self.media_root)
            .output()
            .expect("run cms.py");
        assert!(
            out.status.success(),
            "cms.py {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Wagtail's own API v2 detail answers for the live pages of the subtree at
    /// `root` (a url_path), in every locale.
    pub fn api_dump(&self, root: &str) -> Vec<Value> {
        serde_json::from_str(&self.run(&["api-dump", "--root", root])).expect("API dump")
    }
}
