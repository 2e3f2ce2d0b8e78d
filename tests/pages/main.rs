//! Issue 31: CMS pages, against a real Wagtail (tests/wagtail, made by
//! scripts/wagtail-env.sh) on SQLite and on PostgreSQL.

mod cms;
mod reader;
