//! Result tables: printed to the terminal and written into docs/BENCHMARKS.md between
//! markers, with the command and the machine that produced them.

use std::path::Path;

pub struct Row {
    pub case: String,
    pub unit: &'static str,
    pub raw: f64,
    /// The same case on the other filesystems a bench measures, in the order of the
    /// table's extra columns (see [`render`]).
    pub others: Vec<f64>,
    pub granary: f64,
}

impl Row {
    /// A row from one value per target: raw first, Granary last, the others between.
    pub fn new(case: String, unit: &'static str, values: Vec<f64>) -> Row {
        let (raw, rest) = values.split_first().expect("a raw value");
        let (granary, others) = rest.split_last().expect("a Granary value");
        Row {
            case,
            unit,
            raw: *raw,
            others: others.to_vec(),
            granary: *granary,
        }
    }
}

/// Seconds of CPU time in `ticks` of the kernel's clock (as /proc reports CPU time).
pub fn ticks_to_seconds(ticks: u64) -> f64 {
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// CPU time the whole machine has spent busy so far (every core, every process, kernel
/// included), from /proc/stat: user, nice, system, irq and softirq. Idle, I/O wait and
/// time the hypervisor gave to other guests (steal) are not this machine's work; guest
/// time is already inside user and nice. None where /proc/stat cannot be read.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| fields.get(i).copied())
        .sum::<Option<u64>>()?;
    Some(ticks_to_seconds(busy))
}

/// The middle value of a run's repetitions.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The table; `others` names the columns between raw and granary.
pub fn render(rows: &[Row], others: &[&str]) -> String {
    render_against(rows, "raw", others)
}

/// [`render`] with the baseline column named `baseline`.
pub fn render_against(rows: &[Row], baseline: &str, others: &[&str]) -> String {
    let mut s = format!("| case | unit | {baseline} |");
    for name in others {
        s.push_str(&format!(" {name} |"));
    }
    s.push_str(&format!(" granary | granary/{baseline} |\n|---|---|---:|"));
    s.push_str(&"---:|".repeat(others.len()));
    s.push_str("---:|---:|\n");
    for r in rows {
        let ratio = if r.raw > 0.0 { r.granary / r.raw } else { 0.0 };
        s.push_str(&format!("| {} | {} | {:.1} |", r.case, r.unit, r.raw));
        for v in &r.others {
            s.push_str(&format!(" {v:.1} |"));
        }
        s.push_str(&format!(" {:.1} | {:.2}x |\n", r.granary, ratio));
    }
    s
}

pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024 / 1024)
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{cores} cores ({cpu}), {mem} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// Replaces the block between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->`
/// (appending it if missing), and says so.
pub fn write_section(path: &Path, marker: &str, body: &str) -> std::io::Result<()> {
    let begin = format!("<!-- {marker}:begin -->");
    let end = format!("<!-- {marker}:end -->");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    let block = format!("{begin}\n{body}{end}");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{block}{}", &old[..a], &old[b + end.len()..]),
        _ => format!("{}\n{block}\n", old.trim_end()),
    };
    std::fs::write(path, new)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
