//! What the lock file must not hold (issue 14): amiquip, unmaintained, and what came in
//! through it — idna 0.1 (RUSTSEC-2024-0421), net2 (RUSTSEC-2020-0016) and nom 4 (a
//! future-incompatibility warning). RabbitMQ goes through lapin (src/rabbitmq.rs).

/// (name, version) of every package in Cargo.lock.
fn locked() -> Vec<(String, String)> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .expect("Cargo.lock");
    let mut packages = Vec::new();
    let mut name = None;
    for line in lock.lines() {
        let value = |l: &str| l.split('"').nth(1).unwrap_or_default().to_owned();
        if line.starts_with("name = ") {
            name = Some(value(line));
        } else if line.starts_with("version = ")
            && let Some(n) = name.take()
        {
            packages.push((n, value(line)));
        }
    }
    packages
}

#[test]
fn no_amiquip_nor_what_it_brought() {
    let packages = locked();
    assert!(packages.iter().any(|(n, _)| n == "lapin"), "lapin is gone?");
    for (name, version) in &packages {
        let banned = match name.as_str() {
            "amiquip" | "net2" => true,
            "idna" => version.starts_with("0.1."),
            "nom" => version.starts_with("4."),
            _ => false,
        };
        assert!(!banned, "Cargo.lock holds {name} {version}");
    }
}
