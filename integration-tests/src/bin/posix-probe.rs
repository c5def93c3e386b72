//! Runs one case of the POSIX conformance suite in a directory and prints what every
//! syscall answered, one line each: `posix-probe setup|run CASE DIR`.

use granary_integration_tests::posix::{find, Probe};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(phase), Some(name), Some(dir)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: posix-probe setup|run CASE DIR");
        std::process::exit(2);
    };
    let Some(case) = find(name) else {
        eprintln!("posix-probe: no case named {name}");
        std::process::exit(2);
    };
    // Modes are given explicitly; the same mask applies on every filesystem compared.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o022) };
    let mut probe = Probe::new(std::path::Path::new(dir));
    match phase.as_str() {
        "setup" => (case.setup)(&mut probe),
        "run" => (case.body)(&mut probe),
        other => {
            eprintln!("posix-probe: unknown phase {other}");
            std::process::exit(2);
        }
    }
    for line in probe.lines {
        println!("{line}");
    }
}
