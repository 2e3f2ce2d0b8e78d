//! Issue 31: CMS pages, against a real Wagtail (tests/wagtail, made by
//! scripts/wagtail-env.sh) on SQLite and on PostgreSQL.

mod atomic;
mod cms;
mod delivery;
mod edits;
#[allow(dead_code)]
#[path = "../e2e/helpers.rs"]
mod helpers;
mod mirror;
#[path = "../common/postgres.rs"]
mod postgres;
mod reader;
