//! The memory probe: the RSS a process gains by joining a mesh of 1,000
//! endpoints and 100 routes (its own role process, `memory-probe`).
//!
//! RSS is counted apart by what it is, from `/proc/self/status` and
//! `/proc/self/smaps` before and after ([`MemSplit`]):
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
//! binary's executable mapping after the join, as file offsets (one hex
//! offset a line; `<file>` with the extension `.before` has those of before
//! the join; each with its `smaps` beside it, `.smaps` appended), to
//! attribute code to symbols with `nm` (see BENCHMARKS.md, Memory). `MESH_BENCH_MEMORY_WRAP="heaptrack -o /tmp/probe"` runs the
//! probe under a tool (its own memory then counts too).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::apps;
use crate::common::{self, RoleProcess, markdown_table, round2, self_sample};

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
    /// This process now: `/proc/self/status` and `/proc/self/smaps`.
    fn sample() -> Result<MemSplit, String> {
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| format!("reading /proc/self/status: {e}"))?;
        let smaps = std::fs::read_to_string("/proc/self/smaps")
            .map_err(|e| format!("reading /proc/self/smaps: {e}"))?;
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        Ok(MemSplit::parse(&status, &smaps, &exe.to_string_lossy()))
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

/// Writes [`resident_code_pages`] to `file`, one hex offset a line, and
/// this process's `/proc/self/smaps` next to it (extension `smaps` added).
fn write_resident_code_pages(file: &std::path::Path) -> Result<(), String> {
    let text: String = resident_code_pages()?
        .iter()
        .map(|p| format!("{p:x}\n"))
        .collect();
    std::fs::write(file, text).map_err(|e| format!("writing {}: {e}", file.display()))?;
    let mut smaps_file = file.as_os_str().to_owned();
    smaps_file.push(".smaps");
    std::fs::copy("/proc/self/smaps", &smaps_file)
        .map(|_| ())
        .map_err(|e| format!("copying /proc/self/smaps: {e}"))
}

/// The resident pages of this binary's executable mappings, as offsets in
/// the file (from `/proc/self/maps` and the present bit of
/// `/proc/self/pagemap`, which needs no privilege).
fn resident_code_pages() -> Result<Vec<u64>, String> {
    use std::io::{Read, Seek, SeekFrom};
    const PAGE: u64 = 4096;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let exe = exe.to_string_lossy();
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("reading /proc/self/maps: {e}"))?;
    let mut pagemap = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| format!("opening /proc/self/pagemap: {e}"))?;
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
            .map_err(|e| format!("reading /proc/self/pagemap: {e}"))?;
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

/// The memory-probe role: joins the mesh and reports RSS before and after.
pub(crate) fn memory_probe_main() -> ! {
    use proxyless::{Bootstrap, Client, XdsClient};
    use tower::ServiceExt;
    common::exit_when_stdin_closes();
    let rt = common::runtime(1);
    let result: Result<Value, String> = rt.block_on(async {
        // The process as an app is before it uses the mesh: runtime up, allocator warm.
        tokio::task::yield_now().await;
        let before = self_sample();
        let before_split = MemSplit::sample()?;
        let pages_file = std::env::var_os("MESH_BENCH_MEMORY_PAGES").map(std::path::PathBuf::from);
        if let Some(file) = &pages_file {
            write_resident_code_pages(&file.with_extension("before"))?;
        }
        let bootstrap = Bootstrap::from_env().map_err(|e| format!("bootstrap: {e}"))?;
        let xds = XdsClient::start(bootstrap);
        let client: Client = Client::new(xds.clone());
        let synced = async {
            for s in 0..MEM_SERVICES {
                xds.wait_for_listener(&format!("mem-{s}"))
                    .await
                    .map_err(|e| format!("mem-{s}: {e}"))?;
            }
            let mut changes = xds.changes();
            loop {
                let endpoints: usize = xds
                    .snapshot()
                    .endpoints
                    .values()
                    .map(|c| c.endpoint_count())
                    .sum();
                if endpoints >= MEM_SERVICES * MEM_ENDPOINTS {
                    return Ok::<_, String>(());
                }
                changes
                    .changed()
                    .await
                    .map_err(|_| "the xDS client stopped".to_owned())?;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), synced)
            .await
            .map_err(|_| "the mesh config did not arrive within 60 s".to_owned())??;
        let synced_sample = self_sample();
        let synced_split = MemSplit::sample()?;
        // One request per service: builds each cluster's balancing state (the
        // endpoints refuse the connection at once).
        for s in 0..MEM_SERVICES {
            let req = http::Request::get(format!("http://mem-{s}/"))
                .body(http_body_util::Full::default())
                .map_err(|e| format!("request: {e}"))?;
            let _ = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(req)).await;
        }
        let after = self_sample();
        let after_split = MemSplit::sample()?;
        if let Some(file) = &pages_file {
            write_resident_code_pages(file)?;
        }
        let snapshot = xds.snapshot();
        let routes: usize = snapshot
            .route_configs
            .values()
            .flat_map(|rc| rc.virtual_hosts.iter())
            .map(|vh| vh.routes.len())
            .sum();
        let endpoints: usize = snapshot
            .endpoints
            .values()
            .map(|c| c.endpoint_count())
            .sum();
        Ok(json!({
            "before_rss_kib": before.rss_kib,
            "before_anon_kib": before.anon_kib,
            "synced_rss_kib": synced_sample.rss_kib,
            "after_rss_kib": after.rss_kib,
            "after_anon_kib": after.anon_kib,
            "peak_rss_kib": after.hwm_kib,
            "split": {
                "before": before_split.to_json(),
                "synced": synced_split.to_json(),
                "after": after_split.to_json(),
            },
            // Snapshots published while joining (a control plane that pushes
            // in steps makes more), and the last one the cache file holds
            // (0: not written yet; the write runs off the measured path).
            "xds_changes": *xds.changes().borrow(),
            "cache_saved_version": xds.cache_status().saved_version,
            "listeners": snapshot.listeners.len(),
            "route_configs": snapshot.route_configs.len(),
            "routes": routes,
            "clusters": snapshot.clusters.len(),
            "endpoints": endpoints,
        }))
    });
    match result {
        Ok(report) => {
            common::announce_ready(report);
            // Wait for the parent to close stdin.
            std::thread::park();
            std::process::exit(0)
        }
        Err(e) => common::fail_role(e),
    }
}

pub(crate) fn measure_memory() -> Result<Value, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    std::fs::write(dir.path().join("mesh.yaml"), memory_config())
        .map_err(|e| format!("writing the memory mesh: {e}"))?;
    let env = [(
        "MESH_BENCH_CONFIG_DIR".to_owned(),
        dir.path().display().to_string(),
    )];
    let mut control = RoleProcess::spawn_role("mesh-control", "control", &[], &env)?;
    let (xds, admin) = common::parse_control_ready(&control.wait_ready(Duration::from_secs(60))?)?;
    let bootstrap = proxyless::control::bootstrap_json(xds, admin, "memory-probe", apps::NAMESPACE);
    let mut probe = match std::env::var("MESH_BENCH_MEMORY_WRAP") {
        // A tool to run the probe under (`heaptrack`, `valgrind --tool=massif`):
        // for finding where the memory goes, not for the figures.
        Ok(wrap) if !wrap.trim().is_empty() => {
            let mut words = wrap.split_whitespace();
            let mut command = std::process::Command::new(words.next().unwrap_or_default());
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find the bench binary to re-execute: {e}"))?;
            command
                .args(words)
                .arg(exe)
                .env(common::ROLE_ENV, "memory-probe")
                .env(apps::BOOTSTRAP_ENV, bootstrap);
            RoleProcess::spawn("memory-probe", command)?
        }
        _ => RoleProcess::spawn_role(
            "memory-probe",
            "memory-probe",
            &[],
            &[(apps::BOOTSTRAP_ENV.to_owned(), bootstrap)],
        )?,
    };
    let report = probe.wait_ready(Duration::from_secs(90))?;
    probe.stop();
    control.stop();
    let mut value: Value =
        serde_json::from_str(&report).map_err(|e| format!("memory probe report: {e}"))?;
    let kib = |k: &str| value.get(k).and_then(Value::as_u64).unwrap_or(0) as f64;
    let added_mb = (kib("after_rss_kib") - kib("before_rss_kib")) / 1024.0;
    let anon_mb = (kib("after_anon_kib") - kib("before_anon_kib")) / 1024.0;
    let added = split_added(&value);
    if let Some(obj) = value.as_object_mut() {
        obj.insert("rss_added_mb".into(), json!(round2(added_mb)));
        obj.insert("anon_added_mb".into(), json!(round2(anon_mb)));
        obj.insert("target_mb".into(), json!(5.0));
        obj.insert("added_mb".into(), added.clone());
    }
    println!("{}", split_table(&added));
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

/// The split as a markdown table: one row per phase.
fn split_table(added: &Value) -> String {
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
        "Memory added, by kind (MB; heap is private to each process, code and rodata are the binary's pages shared by every process running it):\n\n{}",
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
