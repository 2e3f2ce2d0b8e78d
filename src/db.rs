//! Database connection chosen by URL scheme (`sqlite://`, `postgres://`), with the
//! migrations of `migrations/<store>/<backend>/` applied at start.
//!
//! Both backends go through sqlx's `Any` driver with a schema restricted to the types
//! it maps on both (TEXT, BIGINT, BLOB/BYTEA), so every query is written once with `$n`
//! placeholders and tested on both backends by the store suite.

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

static SOURCE_SQLITE: Migrator = sqlx::migrate!("migrations/source/sqlite");
static SOURCE_POSTGRES: Migrator = sqlx::migrate!("migrations/source/postgres");
static TARGET_SQLITE: Migrator = sqlx::migrate!("migrations/target/sqlite");
static TARGET_POSTGRES: Migrator = sqlx::migrate!("migrations/target/postgres");

/// Which store's schema a database holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    Source,
    Target,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL {0} (expected sqlite://PATH or postgres://...)")]
    Scheme(String),
    #[error("cannot open database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot migrate database {url}: {source}")]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
}

/// A connection pool and the backend behind it.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    /// The URL with any password replaced, for messages.
    pub redacted_url: String,
    /// The URL as given (with its password): for extra connections such as a
    /// PostgreSQL LISTEN. Its Debug form is redacted.
    pub url: SecretUrl,
}

/// A database URL that may hold a password; printed as `***`.
#[derive(Clone)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: String) -> SecretUrl {
        SecretUrl(url)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The given database URL, or a SQLite file named `file` in `data_dir`.
pub fn url_or_default(url: Option<&str>, data_dir: &std::path::Path, file: &str) -> String {
    url.map(str::to_string)
        .unwrap_or_else(|| format!("sqlite://{}", data_dir.join(file).display()))
}

/// Replaces the password of a URL (`postgres://user:secret@host` becomes
/// `postgres://user:***@host`).
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((auth, host)) = rest.split_once('@')
        && let Some((user, _pw)) = auth.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

/// Connects without migrating (administrative connections, e.g. to create databases).
pub async fn connect_raw(url: &str) -> Result<AnyPool, DbError> {
    install_default_drivers();
    AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|source| DbError::Connect {
            url: redact(url),
            source,
        })
}

/// The backend of a URL, and the URL with SQLite's open mode (`mode`, unless the URL
/// sets its own options).
fn backend_of(url: &str, mode: &str) -> Result<(Backend, String), DbError> {
    if let Some(rest) = url.strip_prefix("sqlite://") {
        let u = if rest.contains('?') {
            url.to_string()
        } else {
            format!("{url}?mode={mode}")
        };
        Ok((Backend::Sqlite, u))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok((Backend::Postgres, url.to_string()))
    } else {
        Err(DbError::Scheme(redact(url)))
    }
}

/// How a pool opens its connections: SQLite's open mode, its size, and the statements
/// each new connection runs first.
struct PoolSpec {
    mode: &'static str,
    max: fn(Backend) -> u32,
    setup: fn(Backend) -> &'static [&'static str],
}

async fn open_pool(url: &str, spec: PoolSpec) -> Result<Db, DbError> {
    install_default_drivers();
    let redacted_url = redact(url);
    let (backend, url) = backend_of(url, spec.mode)?;
    let setup = (spec.setup)(backend);
    let pool = AnyPoolOptions::new()
        .max_connections((spec.max)(backend))
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                for stmt in setup {
                    conn.execute(*stmt).await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await
        .map_err(|source| DbError::Connect {
            url: redacted_url.clone(),
            source,
        })?;
    Ok(Db {
        pool,
        backend,
        redacted_url,
        url: SecretUrl(url),
    })
}

/// Opens another application's database (a CMS's) read-only and as it is: SQLite in
/// `mode=ro` with nothing changed (not even its journal mode), PostgreSQL sessions
/// with read-only transactions.
pub async fn connect_read_only(url: &str) -> Result<Db, DbError> {
    let spec = PoolSpec {
        mode: "ro",
        max: |_| 2,
        setup: |b| match b {
            Backend::Sqlite => &["PRAGMA busy_timeout = 10000"],
            Backend::Postgres => &["SET default_transaction_read_only = on"],
        },
    };
    open_pool(url, spec).await
}

/// Opens (creating a SQLite file if missing) and migrates a database.
pub async fn connect(url: &str, schema: Schema) -> Result<Db, DbError> {
    if let Some(rest) = url.strip_prefix("sqlite://")
        && let Some(parent) = std::path::Path::new(rest.split('?').next().unwrap_or(rest))
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
    {
        let _ = std::fs::create_dir_all(parent);
    }
    let spec = PoolSpec {
        mode: "rwc",
        max: |b| if b == Backend::Sqlite { 4 } else { 8 },
        // WAL for concurrent readers; FULL so a committed ledger row (and the ack that
        // follows it) survives a power cut.
        setup: |b| match b {
            Backend::Sqlite => &[
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = FULL",
                "PRAGMA busy_timeout = 10000",
                "PRAGMA foreign_keys = ON",
            ],
            Backend::Postgres => &[],
        },
    };
    let db = open_pool(url, spec).await?;
    let (pool, backend, redacted_url) = (&db.pool, db.backend, &db.redacted_url);
    let migrator = match (schema, backend) {
        (Schema::Source, Backend::Sqlite) => &SOURCE_SQLITE,
        (Schema::Source, Backend::Postgres) => &SOURCE_POSTGRES,
        (Schema::Target, Backend::Sqlite) => &TARGET_SQLITE,
        (Schema::Target, Backend::Postgres) => &TARGET_POSTGRES,
    };
    migrator
        .run(pool)
        .await
        .map_err(|source| DbError::Migrate {
            url: redacted_url.clone(),
            source,
        })?;
    Ok(db)
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
