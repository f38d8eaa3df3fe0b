//! What a run produces: `results.json` (medians with their spread, the
//! machine), a table for the terminal, and an SVG plot of connection
//! latency and programming time against the number of services.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

use crate::modes::Mode;

#[derive(Serialize)]
pub struct Results {
    pub machine: Machine,
    pub runs: Vec<Run>,
}

#[derive(Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub rounds: usize,
    pub connections_per_round: usize,
    /// Flows of the steady NodePort flood.
    pub udp_flows: u16,
    /// How long the steady flood lasts; the new-flow flood lasts half.
    pub udp_seconds: f64,
    /// Whether vipr ran with its XDP forwarding fast path.
    pub xdp_redirect: bool,
    /// How the floods were made and counted.
    pub udp_method: String,
}

impl Machine {
    pub fn describe(
        rounds: usize,
        connections: usize,
        flows: u16,
        udp_seconds: f64,
        xdp_redirect: bool,
        napi_pinned: bool,
    ) -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        Machine {
            kernel,
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            rounds,
            connections_per_round: connections,
            udp_flows: flows,
            udp_seconds,
            xdp_redirect,
            udp_method: format!(
                "generated in XDP (BPF_PROG_TEST_RUN live frames) on CPU 0 of the client \
                 namespace, forwarded by the node in its uplink's NAPI thread{}, counted and \
                 dropped by an XDP sink on each backend's eth0",
                if napi_pinned {
                    " pinned to CPU 1"
                } else {
                    " (one CPU: not pinned apart)"
                }
            ),
        }
    }
}

/// The median of a figure over the rounds, with the smallest and largest.
#[derive(Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        Some(Spread {
            median: sorted[sorted.len() / 2],
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }
}

#[derive(Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Latency {
    /// The percentiles of `samples` (µs); zeros for none.
    pub fn of(mut samples: Vec<f64>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_by(f64::total_cmp);
        let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        Latency {
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
        }
    }
}

/// One mode at one scale, over all rounds.
#[derive(Serialize)]
pub struct Run {
    pub mode: Mode,
    pub services: usize,
    pub endpoints_per_service: usize,
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Medians over the rounds of each round's percentiles.
    pub conn_latency_us: Option<Latency>,
    /// Connections straight to the pods, each right after one of this
    /// mode's (medians over the rounds, as above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paired_direct_latency_us: Option<Latency>,
    /// This mode's p50 over the paired direct p50, median over the rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_vs_direct: Option<f64>,
    pub conn_per_s: Option<f64>,
    pub udp_pps: Option<f64>,
    /// NodePort datagrams per second when every one is a new flow.
    pub udp_new_flow_pps: Option<f64>,
    pub program_all_ms: Option<f64>,
    pub program_one_change_ms: Option<f64>,
    /// vipr only: `vipr apply` to programmed maps, store commit included.
    pub apply_all_ms: Option<f64>,
    pub apply_one_change_ms: Option<f64>,
    pub rss_mib: Option<f64>,
    /// Every figure's spread over the rounds.
    pub spread: BTreeMap<&'static str, Spread>,
    pub connection_failures: usize,
    /// Connections that waited for a SYN retransmit (over all rounds).
    pub connections_retransmitted: usize,
}

/// One round's figures for one mode and scale.
#[derive(Default)]
pub struct Round {
    pub latency: Latency,
    /// Direct connections made alongside (none for the direct mode).
    pub paired_direct: Option<Latency>,
    pub conn_per_s: f64,
    pub udp_pps: f64,
    pub udp_new_flow_pps: f64,
    pub program_all_ms: Option<f64>,
    pub program_one_change_ms: Option<f64>,
    pub apply_all_ms: Option<f64>,
    pub apply_one_change_ms: Option<f64>,
    pub rss_mib: Option<f64>,
    pub failures: usize,
    pub retransmitted: usize,
}

impl Run {
    pub fn unavailable(mode: Mode, services: usize, endpoints: usize, reason: String) -> Run {
        Run {
            mode,
            services,
            endpoints_per_service: endpoints,
            available: false,
            reason: Some(reason),
            conn_latency_us: None,
            paired_direct_latency_us: None,
            p50_vs_direct: None,
            conn_per_s: None,
            udp_pps: None,
            udp_new_flow_pps: None,
            program_all_ms: None,
            program_one_change_ms: None,
            apply_all_ms: None,
            apply_one_change_ms: None,
            rss_mib: None,
            spread: BTreeMap::new(),
            connection_failures: 0,
            connections_retransmitted: 0,
        }
    }

    pub fn from_rounds(mode: Mode, services: usize, endpoints: usize, rounds: &[Round]) -> Run {
        let mut spread = BTreeMap::new();
        // A figure's median over the rounds that have it; its spread is kept.
        let mut figure = |name: &'static str, of: fn(&Round) -> Option<f64>| {
            let values: Vec<f64> = rounds.iter().filter_map(of).collect();
            let s = Spread::of(&values)?;
            spread.insert(name, s);
            Some(s.median)
        };
        let p50 = figure("conn_latency_p50_us", |r| Some(r.latency.p50));
        let p90 = figure("conn_latency_p90_us", |r| Some(r.latency.p90));
        let p99 = figure("conn_latency_p99_us", |r| Some(r.latency.p99));
        let direct_p50 = figure("paired_direct_p50_us", |r| r.paired_direct.map(|l| l.p50));
        let direct_p90 = figure("paired_direct_p90_us", |r| r.paired_direct.map(|l| l.p90));
        let direct_p99 = figure("paired_direct_p99_us", |r| r.paired_direct.map(|l| l.p99));
        let p50_vs_direct = figure("p50_vs_direct", |r| {
            r.paired_direct.map(|d| r.latency.p50 / d.p50)
        });
        let conn_per_s = figure("conn_per_s", |r| Some(r.conn_per_s));
        let udp_pps = figure("udp_pps", |r| Some(r.udp_pps));
        let udp_new_flow_pps = figure("udp_new_flow_pps", |r| Some(r.udp_new_flow_pps));
        let program_all_ms = figure("program_all_ms", |r| r.program_all_ms);
        let program_one_change_ms = figure("program_one_change_ms", |r| r.program_one_change_ms);
        let apply_all_ms = figure("apply_all_ms", |r| r.apply_all_ms);
        let apply_one_change_ms = figure("apply_one_change_ms", |r| r.apply_one_change_ms);
        let rss_mib = figure("rss_mib", |r| r.rss_mib);
        Run {
            mode,
            services,
            endpoints_per_service: endpoints,
            available: true,
            reason: None,
            conn_latency_us: match (p50, p90, p99) {
                (Some(p50), Some(p90), Some(p99)) => Some(Latency { p50, p90, p99 }),
                _ => None,
            },
            paired_direct_latency_us: match (direct_p50, direct_p90, direct_p99) {
                (Some(p50), Some(p90), Some(p99)) => Some(Latency { p50, p90, p99 }),
                _ => None,
            },
            p50_vs_direct,
            conn_per_s,
            udp_pps,
            udp_new_flow_pps,
            program_all_ms,
            program_one_change_ms,
            apply_all_ms,
            apply_one_change_ms,
            rss_mib,
            spread,
            connection_failures: rounds.iter().map(|r| r.failures).sum(),
            connections_retransmitted: rounds.iter().map(|r| r.retransmitted).sum(),
        }
    }
}

impl Results {
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("results.json"), json)?;
        self.plot(&dir.join("results.svg"))
    }

    /// The terminal table, then each target ratio at the largest scale.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<16} {:>8} {:>22} {:>9} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11} {:>8}\n",
            "mode",
            "services",
            "connect p50/p90/p99 µs",
            "conn/s",
            "udp pps",
            "new-fl pps",
            "program ms",
            "1 change ms",
            "apply ms",
            "apply 1 ms",
            "RSS MiB"
        );
        let opt = |v: Option<f64>, precision: usize| {
            v.map_or("-".to_owned(), |v| format!("{v:.precision$}"))
        };
        for run in &self.runs {
            if !run.available {
                out.push_str(&format!(
                    "{:<16} {:>8} unavailable: {}\n",
                    run.mode.name(),
                    run.services,
                    run.reason.as_deref().unwrap_or("")
                ));
                continue;
            }
            let latency = run.conn_latency_us.map_or("-".to_owned(), |l| {
                format!("{:.0}/{:.0}/{:.0}", l.p50, l.p90, l.p99)
            });
            out.push_str(&format!(
                "{:<16} {:>8} {:>22} {:>9} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11} {:>8}\n",
                run.mode.name(),
                run.services,
                latency,
                opt(run.conn_per_s, 0),
                opt(run.udp_pps, 0),
                opt(run.udp_new_flow_pps, 0),
                opt(run.program_all_ms, 1),
                opt(run.program_one_change_ms, 3),
                opt(run.apply_all_ms, 1),
                opt(run.apply_one_change_ms, 2),
                opt(run.rss_mib, 1)
            ));
        }
        out.push_str(&self.ratios());
        out
    }

    fn find(&self, mode: Mode, services: usize) -> Option<&Run> {
        self.runs
            .iter()
            .find(|r| r.mode == mode && r.services == services && r.available)
    }

    /// vipr against the others at the largest scale measured.
    fn ratios(&self) -> String {
        let Some(largest) = self.runs.iter().map(|r| r.services).max() else {
            return String::new();
        };
        let (Some(vipr), Some(direct), Some(ipt)) = (
            self.find(Mode::Vipr, largest),
            self.find(Mode::Direct, largest),
            self.find(Mode::IptablesLegacy, largest)
                .or_else(|| self.find(Mode::IptablesNft, largest)),
        ) else {
            return String::new();
        };
        let p50 = |r: &Run| r.conn_latency_us.map(|l| l.p50);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let paired = vipr
            .p50_vs_direct
            .map_or("-".to_owned(), |r| format!("{r:.2}x"));
        format!(
            "\nat {largest} services: vipr p50 connect = {paired} of direct measured alongside \
             ({} of the direct mode's own rounds), {} of {}; \
             one change programmed {} faster than {} ({} counting vipr's apply and store \
             commit); NodePort pps {} of {} with the flows open, {} with every datagram a new flow\n",
            ratio(p50(vipr), p50(direct)),
            ratio(p50(vipr), p50(ipt)),
            ipt.mode.name(),
            ratio(ipt.program_one_change_ms, vipr.program_one_change_ms),
            ipt.mode.name(),
            ratio(ipt.program_one_change_ms, vipr.apply_one_change_ms),
            ratio(vipr.udp_pps, ipt.udp_pps),
            ipt.mode.name(),
            ratio(vipr.udp_new_flow_pps, ipt.udp_new_flow_pps),
        )
    }

    fn plot(&self, path: &Path) -> Result<()> {
        let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(550);
        let modes: Vec<Mode> = Mode::ALL
            .into_iter()
            .filter(|m| self.runs.iter().any(|r| r.mode == *m && r.available))
            .collect();
        let series = |f: &dyn Fn(&Run) -> Option<f64>, mode: Mode| -> Vec<(f64, f64)> {
            self.runs
                .iter()
                .filter(|r| r.mode == mode && r.available)
                .filter_map(|r| Some((r.services.max(1) as f64, f(r)?)))
                .collect()
        };
        let max_services = self
            .runs
            .iter()
            .map(|r| r.services)
            .max()
            .unwrap_or(1)
            .max(10) as f64;
        type Figure<'f> = &'f dyn Fn(&Run) -> Option<f64>;
        let panels: [(&DrawingArea<_, _>, &str, Figure); 2] = [
            (&left, "new connection p50 (µs)", &|r: &Run| {
                r.conn_latency_us.map(|l| l.p50)
            }),
            (&right, "program all services (ms)", &|r: &Run| {
                r.program_all_ms
            }),
        ];
        for (area, title, f) in panels {
            let max_y = modes
                .iter()
                .flat_map(|m| series(f, *m))
                .map(|(_, y)| y)
                .fold(1.0_f64, f64::max);
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(
                    (1.0..max_services * 1.5).log_scale(),
                    (0.01..max_y * 2.0).log_scale(),
                )?;
            chart.configure_mesh().x_desc("services").draw()?;
            for (k, mode) in modes.iter().enumerate() {
                let points = series(f, *mode);
                if points.is_empty() {
                    continue;
                }
                let color = Palette99::pick(k).to_rgba();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(mode.name())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}
