//! Tells the unit tests whether they run under CI (`CI=true`), where a test whose
//! prerequisite is missing must fail rather than be ignored.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ci)");
    println!("cargo:rerun-if-env-changed=CI");
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        println!("cargo:rustc-cfg=ci");
    }
}
