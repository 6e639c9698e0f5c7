//! The memory probe: the RSS a process gains by joining a mesh of 1,000
//! endpoints and 100 routes and calling each of its 10 services once.
//!
//! The probe's code is `examples/memory_probe.rs`, run twice: inside this
//! bench binary (the `memory-probe` role), and as the example's own binary,
//! built by `cargo build [--release] --example memory_probe`. The bench
//! binary also holds the load generator, the plain and TLS apps, the Envoy
//! runner and the plots, whose code shares the 64 KiB windows the mesh's
//! code faults in; the example is shaped as a service's binary is (the
//! service and the mesh). Both figures are reported.
//!
//! The probe process runs no measuring code: it stops between steps and this
//! process samples it, from `/proc/<pid>/status` and `/proc/<pid>/smaps`
//! before the join, once synced and after the calls, counting RSS apart by
//! what it is ([`MemSplit`]):
//!
//! - **heap**: anonymous memory (`RssAnon`): the allocator's arenas, thread
//!   stacks, the binary's relocated data. Private to the process: this is
//!   what each process of a host pays.
//! - **code**: the binary's executable pages that are resident
//!   (file-backed). Shared by every process running the same binary (the
//!   page cache holds one copy), and faulted in by 64 KiB windows
//!   (the kernel's fault-around), so what matters is how many windows the
//!   mesh's code spans, not only how many bytes it runs.
//! - **rodata**: the binary's read-only pages (constants, string tables,
//!   unwind tables), file-backed and shared likewise.
//! - **other**: the rest (shared libraries, shared memory).
//!
//! `MESH_BENCH_MEMORY_PAGES=<file>` also writes the resident pages of the
//! binary's executable mapping after the calls, as file offsets (one hex
//! offset a line; `<file>` with the extension `.before` has those of before
//! the join; each with its `smaps` beside it, `.smaps` appended; `<file>`
//! with `-service` appended has the service binary's), to attribute code to
//! symbols with `nm` (see BENCHMARKS.md, Memory).
//! `MESH_BENCH_MEMORY_WRAP="heaptrack -o /tmp/probe"` runs each probe under
//! a tool (for finding where memory goes, not for the figures).
//! `MESH_BENCH_MEMORY_SERVICE=<path>` runs that build of the example as the
//! service binary instead of building it (e.g. one built with a service's
//! own profile: `opt-level = "s"`, LTO).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::apps;
use crate::common::{self, RoleProcess, markdown_table, round2};

/// Services, routes per service and endpoints per service of the memory probe's mesh.
const MEM_SERVICES: usize = 10;
const MEM_ROUTES: usize = 10;
const MEM_ENDPOINTS: usize = 100;

/// A process's resident memory by kind, in KiB (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MemSplit {
    /// `VmRSS`.
    rss: u64,
    /// `RssAnon`: private anonymous pages (heap, stacks, written data).
    anon: u64,
    /// `RssFile`: file-backed pages (the binary, shared libraries).
    file: u64,
    /// `RssShmem`.
    shmem: u64,
    /// The binary's executable mappings: resident file-backed pages.
    code: u64,
    /// The binary's non-executable mappings: resident file-backed pages
    /// (read-only data, unwind tables).
    rodata: u64,
    /// The binary's mappings: anonymous pages (relocated and written data).
    binary_anon: u64,
    /// `[heap]`: the main allocator arena (brk).
    brk_heap: u64,
    /// Other anonymous mappings: per-thread allocator arenas, large
    /// allocations, thread stacks.
    anon_maps: u64,
}

impl MemSplit {
    /// Process `pid` now: `/proc/<pid>/status` and `/proc/<pid>/smaps`.
    fn sample(pid: u32) -> Result<MemSplit, String> {
        let read = |file: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/{file}"))
                .map_err(|e| format!("reading /proc/{pid}/{file}: {e}"))
        };
        let (status, smaps) = (read("status")?, read("smaps")?);
        Ok(MemSplit::parse(&status, &smaps, &exe_of(pid)?))
    }

    /// The split from the text of `status` and `smaps`, for the binary at `exe`.
    fn parse(status: &str, smaps: &str, exe: &str) -> MemSplit {
        let kib = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let mut split = MemSplit {
            rss: kib(status, "VmRSS:"),
            anon: kib(status, "RssAnon:"),
            file: kib(status, "RssFile:"),
            shmem: kib(status, "RssShmem:"),
            ..MemSplit::default()
        };
        // A rebuilt binary shows as "<path> (deleted)" in the maps of a
        // process still running the old one.
        let exe = exe.strip_suffix(" (deleted)").unwrap_or(exe);
        let mut kind = Kind::Other;
        let mut rss = 0;
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else {
                continue;
            };
            if let Some(key) = first.strip_suffix(':') {
                let value = words
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                match key {
                    "Rss" => rss = value,
                    // `Anonymous` follows `Rss` in every mapping.
                    "Anonymous" => split.add(kind, rss, value),
                    _ => {}
                }
                continue;
            }
            // A mapping: `start-end perms offset dev inode [path]`.
            let perms = words.next().unwrap_or("");
            let path = words.nth(3).map_or("", |first_word| {
                line.find(first_word).map_or("", |at| line[at..].trim_end())
            });
            kind = if path.strip_suffix(" (deleted)").unwrap_or(path) == exe {
                if perms.contains('x') {
                    Kind::Code
                } else {
                    Kind::BinaryData
                }
            } else if path == "[heap]" {
                Kind::BrkHeap
            } else if path.starts_with('/') {
                Kind::Other
            } else {
                Kind::AnonMap
            };
            rss = 0;
        }
        split
    }

    /// Counts a mapping of `kind` with `rss` KiB resident, `anonymous` of them anonymous.
    fn add(&mut self, kind: Kind, rss: u64, anonymous: u64) {
        let file_backed = rss.saturating_sub(anonymous);
        match kind {
            Kind::Code => {
                self.code += file_backed;
                self.binary_anon += anonymous;
            }
            Kind::BinaryData => {
                self.rodata += file_backed;
                self.binary_anon += anonymous;
            }
            Kind::BrkHeap => self.brk_heap += anonymous,
            Kind::AnonMap => self.anon_maps += anonymous,
            Kind::Other => {}
        }
    }

    fn to_json(self) -> Value {
        json!({
            "rss_kib": self.rss,
            "anon_kib": self.anon,
            "file_kib": self.file,
            "shmem_kib": self.shmem,
            "code_kib": self.code,
            "rodata_kib": self.rodata,
            "binary_anon_kib": self.binary_anon,
            "brk_heap_kib": self.brk_heap,
            "anon_maps_kib": self.anon_maps,
        })
    }
}

/// What a mapping of `smaps` holds, for [`MemSplit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The binary's executable mappings.
    Code,
    /// The binary's other mappings.
    BinaryData,
    /// `[heap]`.
    BrkHeap,
    /// Anonymous mappings, `[stack]` and the like.
    AnonMap,
    /// Other files: shared libraries.
    Other,
}

/// The path of the binary process `pid` runs (`/proc/<pid>/exe`), as its
/// maps name it.
fn exe_of(pid: u32) -> Result<String, String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(|e| format!("reading /proc/{pid}/exe: {e}"))?;
    let exe = exe.to_string_lossy();
    Ok(exe.strip_suffix(" (deleted)").unwrap_or(&exe).to_owned())
}

/// Writes [`resident_code_pages`] of process `pid` to `file`, one hex offset
/// a line, and its `/proc/<pid>/smaps` next to it (extension `smaps` added).
fn write_resident_code_pages(pid: u32, file: &std::path::Path) -> Result<(), String> {
    let text: String = resident_code_pages(pid)?
        .iter()
        .map(|p| format!("{p:x}\n"))
        .collect();
    std::fs::write(file, text).map_err(|e| format!("writing {}: {e}", file.display()))?;
    let mut smaps_file = file.as_os_str().to_owned();
    smaps_file.push(".smaps");
    std::fs::copy(format!("/proc/{pid}/smaps"), &smaps_file)
        .map(|_| ())
        .map_err(|e| format!("copying /proc/{pid}/smaps: {e}"))
}

/// The resident pages of the executable mappings of the binary process
/// `pid` runs, as offsets in the file (from `/proc/<pid>/maps` and the
/// present bit of `/proc/<pid>/pagemap`, which needs no privilege over a
/// child of ours).
fn resident_code_pages(pid: u32) -> Result<Vec<u64>, String> {
    use std::io::{Read, Seek, SeekFrom};
    const PAGE: u64 = 4096;
    let exe = exe_of(pid)?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("reading /proc/{pid}/maps: {e}"))?;
    let mut pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| format!("opening /proc/{pid}/pagemap: {e}"))?;
    let mut pages = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [range, perms, offset, _dev, _inode, path, ..] = fields[..] else {
            continue;
        };
        if !perms.contains('x') || path.strip_suffix(" (deleted)").unwrap_or(path) != exe {
            continue;
        }
        let parse = |s: &str| u64::from_str_radix(s, 16).map_err(|e| format!("{line}: {e}"));
        let (start, end) = range
            .split_once('-')
            .ok_or_else(|| format!("{line}: no range"))?;
        let (start, end, file_offset) = (parse(start)?, parse(end)?, parse(offset)?);
        let count = usize::try_from((end - start) / PAGE).map_err(|e| e.to_string())?;
        let mut entries = vec![0u8; count * 8];
        pagemap
            .seek(SeekFrom::Start(start / PAGE * 8))
            .and_then(|_| pagemap.read_exact(&mut entries))
            .map_err(|e| format!("reading /proc/{pid}/pagemap: {e}"))?;
        for (i, entry) in entries.chunks_exact(8).enumerate() {
            let bits = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            if bits >> 63 == 1 {
                pages.push(file_offset + i as u64 * PAGE);
            }
        }
    }
    Ok(pages)
}

/// Istio YAML for `MEM_SERVICES` services of `MEM_ROUTES` routes and
/// `MEM_ENDPOINTS` endpoints each (1,000 endpoints, 100 routes). Endpoints are
/// loopback ports nobody listens on, so a request to one fails at once.
fn memory_config() -> String {
    let mut yaml = String::new();
    for s in 0..MEM_SERVICES {
        let name = format!("mem-{s}");
        let _ = write!(
            yaml,
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{name}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints:\n",
            ns = apps::NAMESPACE
        );
        for e in 0..MEM_ENDPOINTS {
            let port = 30_000 + s * MEM_ENDPOINTS + e;
            let _ = writeln!(
                yaml,
                "  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{version: v{}}}}}",
                e % 2 + 1
            );
        }
        let _ = write!(
            yaml,
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{name}]\n  http:\n",
            ns = apps::NAMESPACE
        );
        for r in 0..MEM_ROUTES {
            if r + 1 == MEM_ROUTES {
                let _ = writeln!(
                    yaml,
                    "  - name: r{r}\n    route: [{{destination: {{host: {name}}}}}]"
                );
            } else {
                let _ = writeln!(
                    yaml,
                    "  - name: r{r}\n    match: [{{uri: {{prefix: /api/r{r}/}}, headers: {{x-user: {{exact: user-{r}}}}}}}]\n    route: [{{destination: {{host: {name}}}}}]"
                );
            }
        }
        yaml.push_str("---\n");
    }
    yaml
}

/// The probe's code: the example `memory_probe` (a service-shaped binary of
/// its own), compiled here too for the bench binary's probe role.
#[path = "../../examples/memory_probe.rs"]
#[allow(dead_code)] // Its `main`: the role is `run`.
mod service;

/// The memory-probe role: the example's code inside the bench binary.
pub(crate) fn memory_probe_main() -> ! {
    match service::run() {
        Ok(()) => std::process::exit(0),
        Err(e) => common::fail_role(e),
    }
}

/// Where the service-shaped probe is built: the example `memory_probe` of
/// this bench binary's profile (`release` under `cargo bench`, `debug` under
/// `cargo test`), built now by cargo (a no-op when fresh).
/// `MESH_BENCH_MEMORY_SERVICE=<path>` runs that binary instead (one built
/// already, or with a service's own release profile: `opt-level = "s"`, LTO).
fn build_service_probe() -> Result<std::path::PathBuf, String> {
    if let Some(path) = std::env::var_os("MESH_BENCH_MEMORY_SERVICE").filter(|p| !p.is_empty()) {
        return Ok(path.into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench binary: {e}"))?;
    // <target dir>/<profile dir>/deps/overhead-<hash>
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| format!("{}: not in a cargo target directory", exe.display()))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("{}: not in a cargo target directory", exe.display()))?;
    let mut command =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .args([
            "build",
            "--quiet",
            "--example",
            "memory_probe",
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("release") => {
            command.arg("--release");
        }
        Some("debug") => {}
        other => return Err(format!("unknown cargo profile directory {other:?}")),
    }
    println!("memory probe: building the service-shaped probe ({command:?})");
    let status = command
        .status()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{command:?}: {status}"));
    }
    Ok(profile_dir.join("examples").join("memory_probe"))
}

/// Runs one probe process (`command`: the bench binary as the
/// `memory-probe` role, or the example) through its steps (see
/// `examples/memory_probe.rs`), sampling its memory from here while it
/// waits between them, so that the probe runs no measuring code of its own.
/// `pages_file`: where to write its resident code pages (`MESH_BENCH_MEMORY_PAGES`).
fn run_probe(
    name: &str,
    mut command: std::process::Command,
    bootstrap: &str,
    pages_file: Option<&std::path::Path>,
) -> Result<Value, String> {
    command
        .env(apps::BOOTSTRAP_ENV, bootstrap)
        .env("MESH_PROBE_SERVICES", MEM_SERVICES.to_string())
        .env(
            "MESH_PROBE_ENDPOINTS",
            (MEM_SERVICES * MEM_ENDPOINTS).to_string(),
        );
    let mut probe = RoleProcess::spawn(name, command)?;
    let timeout = Duration::from_secs(90);
    let started: Value = serde_json::from_str(&probe.wait_ready(timeout)?)
        .map_err(|e| format!("{name}: first line: {e}"))?;
    // Its own pid: not the wrapper's under `MESH_BENCH_MEMORY_WRAP`.
    let pid = started
        .get("pid")
        .and_then(Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| format!("{name} announced no pid: {started}"))?;
    let sample = || common::proc_sample(pid).ok_or_else(|| format!("{name} is gone"));
    let before = sample()?;
    let before_split = MemSplit::sample(pid)?;
    if let Some(file) = pages_file {
        write_resident_code_pages(pid, &file.with_extension("before"))?;
    }
    probe.send_line("join")?;
    probe.wait_ready(timeout)?;
    let synced = sample()?;
    let synced_split = MemSplit::sample(pid)?;
    probe.send_line("call")?;
    probe.wait_ready(timeout)?;
    let after = sample()?;
    let after_split = MemSplit::sample(pid)?;
    if let Some(file) = pages_file {
        write_resident_code_pages(pid, file)?;
    }
    probe.send_line("report")?;
    let mut report: Value = serde_json::from_str(&probe.wait_ready(timeout)?)
        .map_err(|e| format!("{name} report: {e}"))?;
    probe.stop();
    if let Some(obj) = report.as_object_mut() {
        for (key, value) in [
            ("before_rss_kib", json!(before.rss_kib)),
            ("before_anon_kib", json!(before.anon_kib)),
            ("synced_rss_kib", json!(synced.rss_kib)),
            ("after_rss_kib", json!(after.rss_kib)),
            ("after_anon_kib", json!(after.anon_kib)),
            ("peak_rss_kib", json!(after.hwm_kib)),
            (
                "split",
                json!({
                    "before": before_split.to_json(),
                    "synced": synced_split.to_json(),
                    "after": after_split.to_json(),
                }),
            ),
        ] {
            obj.insert(key.to_owned(), value);
        }
    }
    let kib = |k: &str| report.get(k).and_then(Value::as_u64).unwrap_or(0) as f64;
    let added_mb = (kib("after_rss_kib") - kib("before_rss_kib")) / 1024.0;
    let anon_mb = (kib("after_anon_kib") - kib("before_anon_kib")) / 1024.0;
    let added = split_added(&report);
    if let Some(obj) = report.as_object_mut() {
        obj.insert("rss_added_mb".into(), json!(round2(added_mb)));
        obj.insert("anon_added_mb".into(), json!(round2(anon_mb)));
        obj.insert("target_mb".into(), json!(5.0));
        obj.insert("added_mb".into(), added);
    }
    Ok(report)
}

/// A command running `program` under `MESH_BENCH_MEMORY_WRAP` when set (a
/// tool such as `heaptrack -o /tmp/probe` or `valgrind --tool=massif`: for
/// finding where the memory goes, not for the figures; the tool's own memory
/// is not counted, the probe announces its own pid).
fn probe_command(program: &std::path::Path) -> std::process::Command {
    match std::env::var("MESH_BENCH_MEMORY_WRAP") {
        Ok(wrap) if !wrap.trim().is_empty() => {
            let mut words = wrap.split_whitespace();
            let mut command = std::process::Command::new(words.next().unwrap_or_default());
            command.args(words).arg(program);
            command
        }
        _ => std::process::Command::new(program),
    }
}

/// The memory row: the probe in the bench binary (the top-level keys) and in
/// the service-shaped example binary (`service_binary`).
pub(crate) fn measure_memory() -> Result<Value, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    std::fs::write(dir.path().join("mesh.yaml"), memory_config())
        .map_err(|e| format!("writing the memory mesh: {e}"))?;
    let env = [(
        "MESH_BENCH_CONFIG_DIR".to_owned(),
        dir.path().display().to_string(),
    )];
    let service_probe = build_service_probe();
    let mut control = RoleProcess::spawn_role("mesh-control", "control", &[], &env)?;
    let (xds, admin) = common::parse_control_ready(&control.wait_ready(Duration::from_secs(60))?)?;
    let bootstrap = proxyless::control::bootstrap_json(xds, admin, "memory-probe", apps::NAMESPACE);
    let pages_file = std::env::var_os("MESH_BENCH_MEMORY_PAGES").map(std::path::PathBuf::from);

    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the bench binary to re-execute: {e}"))?;
    let mut command = probe_command(&exe);
    command.env(common::ROLE_ENV, "memory-probe");
    let bench = run_probe("memory-probe", command, &bootstrap, pages_file.as_deref());

    let service = service_probe.and_then(|program| {
        let pages_file = pages_file.as_ref().map(|f| {
            let mut f = f.clone().into_os_string();
            f.push("-service");
            std::path::PathBuf::from(f)
        });
        let mut report = run_probe(
            "memory-probe (service binary)",
            probe_command(&program),
            &bootstrap,
            pages_file.as_deref(),
        )?;
        if let Some(obj) = report.as_object_mut() {
            obj.insert("binary".into(), json!(program.display().to_string()));
        }
        Ok(report)
    });
    control.stop();

    let mut value = bench?;
    if let Some(added) = value.get("added_mb") {
        println!(
            "{}",
            split_table(
                added,
                "the bench binary (load generator, plain apps, Envoy runner, plots and the mesh)"
            )
        );
    }
    match &service {
        Ok(report) => {
            if let Some(added) = report.get("added_mb") {
                println!(
                    "{}",
                    split_table(
                        added,
                        "a service-shaped binary (examples/memory_probe.rs: the xDS client and the client stack)"
                    )
                );
            }
        }
        Err(e) => common::loud(&format!("memory probe (service binary) failed: {e}")),
    }
    if let Some(obj) = value.as_object_mut() {
        obj.insert(
            "service_binary".into(),
            service.unwrap_or_else(|e| json!({ "available": false, "reason": e })),
        );
    }
    Ok(value)
}

/// The MB each kind of memory grew by from `before` to `synced` (the config
/// arrived) and to `after` (one request per service too), from the probe's
/// report.
fn split_added(report: &Value) -> Value {
    let split = |at: &str, key: &str| {
        report
            .pointer(&format!("/split/{at}/{key}"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as f64
    };
    let grew = |at: &str, key: &str| round2((split(at, key) - split("before", key)) / 1024.0);
    let phase = |at: &str| {
        let rss = grew(at, "rss_kib");
        let heap = grew(at, "anon_kib");
        let code = grew(at, "code_kib");
        let rodata = grew(at, "rodata_kib");
        json!({
            "rss": rss,
            "heap": heap,
            "heap_brk": grew(at, "brk_heap_kib"),
            "heap_other_maps": grew(at, "anon_maps_kib"),
            "binary_written_data": grew(at, "binary_anon_kib"),
            "code": code,
            "rodata": rodata,
            "other": round2(rss - heap - code - rodata),
        })
    };
    json!({ "synced": phase("synced"), "after": phase("after") })
}

/// The split as a markdown table for the probe in `binary`: one row per phase.
fn split_table(added: &Value, binary: &str) -> String {
    let cell = |phase: &str, key: &str| {
        added
            .pointer(&format!("/{phase}/{key}"))
            .and_then(Value::as_f64)
            .map_or_else(|| "?".to_owned(), |v| format!("{v:.2}"))
    };
    let row = |phase: &str, label: &str| {
        let mut row = vec![label.to_owned()];
        for key in [
            "rss",
            "heap",
            "heap_brk",
            "heap_other_maps",
            "code",
            "rodata",
            "other",
        ] {
            row.push(cell(phase, key));
        }
        row
    };
    format!(
        "Memory added in {binary}, by kind (MB; heap is private to each process, code and rodata are the binary's pages shared by every process running it):\n\n{}",
        markdown_table(
            &[
                "when",
                "RSS",
                "heap (anon)",
                "of which brk arena",
                "of which other anon maps",
                "code (r-x)",
                "rodata (r--)",
                "other",
            ],
            &[
                row("synced", "config synced"),
                row("after", "after one request per service"),
            ],
        )
    )
}
