//! What the benchmarks share: CPU time, of this process and of the machine.

/// CPU seconds this process has used (meridian runs in it, beside the
/// benchmark's own client).
pub fn process_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    use nix::sys::time::TimeValLike;
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    (u.user_time().num_microseconds() + u.system_time().num_microseconds()) as f64 / 1e6
}

/// CPU seconds the whole machine has used (every process: PostgreSQL too),
/// from the first line of `/proc/stat` (ticks of 10 ms).
pub fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: f64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, t)| t)
        .sum();
    busy / 100.0
}
