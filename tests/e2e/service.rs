//! Running as a service: the systemd units verify, SIGHUP reloads mirror.toml (a broken
//! file leaves the running configuration), the data directory defaults to beside the
//! configuration file.

use std::process::Command;
use std::time::Duration;

use crate::helpers::*;

#[test]
#[cfg_attr(
    not(any(ci, systemd_analyze)),
    ignore = "needs systemd-analyze (systemd)"
)]
fn the_systemd_units_verify_without_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let mut paths = Vec::new();
    for (unit, bin) in [
        ("mirror-source.service", "mirror-source"),
        ("mirror-target.service", "mirror-target"),
    ] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        assert!(
            text.contains("NoNewPrivileges=yes") && text.contains("ProtectSystem=strict"),
            "{unit}"
        );
        // verify checks that ExecStart's binary exists: point it at the built one.
        let here = text.replace(
            &format!("/usr/local/bin/{bin}"),
            bin_dir().join(bin).to_str().unwrap(),
        );
        let p = tmp.path().join(unit);
        std::fs::write(&p, here).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn sighup_reloads_the_configuration_and_a_broken_one_is_refused() {
    let Mirror {
        tmp,
        src,
        dst: _dst,
        config,
        target,
        source,
    } = Mirror::start(make_tree, "");
    let names = |url: &str| -> Vec<String> {
        let out = mirrorctl(url, &["channels", "--json"]);
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        v.iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&source.url()), ["site"]);
    let toml = std::fs::read_to_string(&config).unwrap()
        + &format!(
            "\n[[channel]]\nname = \"second\"\nsource = \"{}\"\n  [[channel.target]]\n  name = \"web1\"\n  url = \"{}\"\n  site = \"main\"\n",
            src.display(),
            target.url()
        );
    std::fs::write(&config, &toml).unwrap();
    let hup = |pid: u32| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    hup(source.child.id());
    wait_until(Duration::from_secs(20), || {
        let n = names(&source.url());
        ready(n == ["site", "second"], || format!("{n:?}"))
    });
    let out = mirrorctl(&source.url(), &["start", "second", "--wait", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A file with a mistake: logged, and the running configuration stays.
    std::fs::write(
        &config,
        toml.replace("name = \"second\"", "name = \"second\"\nbogus = 1"),
    )
    .unwrap();
    hup(source.child.id());
    wait_until(Duration::from_secs(20), || {
        let log = logs(tmp.path(), "source");
        ready(log.contains("configuration not reloaded"), || log.clone())
    });
    assert!(logs(tmp.path(), "source").contains("bogus"));
    assert_eq!(names(&source.url()), ["site", "second"]);
}

#[test]
fn the_data_directory_defaults_to_beside_the_configuration_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (etc, elsewhere) = (tmp.path().join("etc"), tmp.path().join("cwd"));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    std::fs::create_dir_all(&etc).unwrap();
    let config = write_config(&etc, &src, "http://127.0.0.1:9", "");
    let mut child = Command::new(bin_dir().join("mirror-source"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--check-interval-secs",
            "0",
            "--config",
        ])
        .arg(&config)
        .current_dir(&elsewhere)
        .env_remove("MIRROR_DATA_DIR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let db = etc.join("mirror-source-data/source.db");
    wait_until(Duration::from_secs(30), || {
        ready(db.exists(), || format!("no {}", db.display()))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        std::fs::read_dir(&elsewhere).unwrap().next().is_none(),
        "the working directory got files"
    );
}
