//! A fresh database for one test on the PostgreSQL server of `TEST_DATABASE_URL`
//! (`.ci/run` drops those left by earlier runs).

/// Creates the database; its URL.
pub async fn fresh_database() -> String {
    let base = std::env::var("TEST_DATABASE_URL")
        .expect("TEST_DATABASE_URL must name a PostgreSQL server for this test");
    let admin = cms_mirror::db::connect_raw(&base)
        .await
        .unwrap_or_else(|e| panic!("TEST_DATABASE_URL: {e}"));
    let name = format!("cmsmirror_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    let (prefix, _) = base
        .rsplit_once('/')
        .expect("database URL ends with /DBNAME");
    format!("{prefix}/{name}")
}
