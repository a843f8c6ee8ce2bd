//! The VM view: a connection to the node ([`VmView`], used as is by `leaktrace vm`), and during
//! a run the same view on its own thread ([`VmWorker`]), so that a slow node never holds up the
//! tracing loop: the loop asks for a sample and carries on; answers are filled in when they come.

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    config::VmAccess,
    recording::{
        Census, VmEvidence, VmGap, VmSample,
        vm::{CarrierPicture, MAX_GAPS, cut_text},
    },
    vm::{
        VmClient, VmError,
        discover::{self, CookieSource},
        query::{self, AllocatorSet},
    },
};

/// How long a node may take to answer its first connection (a `run` node boots first).
const CONNECT_GRACE: Duration = Duration::from_secs(15);
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Censuses are spaced at least this far apart, and at least 100 times their own cost, so
/// that their cost on the node stays under 0.5% of one scheduler.
const CENSUS_MIN_EVERY: Duration = Duration::from_secs(10);
const CENSUS_COST_FACTOR: u32 = 200;

/// A connected VM and what it reported so far.
#[derive(Debug)]
pub struct VmView {
    client: VmClient,
    allocators: AllocatorSet,
    top: usize,
    cookie_source: CookieSource,
    found_by: String,
}

impl VmView {
    /// Finds the node and cookie of `pid` and connects.
    pub fn connect(pid: u32, access: &VmAccess) -> Result<VmView, VmError> {
        let addr = discover::find_node(pid, access.node.as_deref())?;
        let (cookie, cookie_source) =
            discover::find_cookie(pid, access.cookie.as_ref(), access.cookie_file.as_deref())?;
        VmView::connect_node(&addr, &cookie, cookie_source, access.top)
    }

    /// Connects to the node at `addr` with `cookie`.
    pub fn connect_node(
        addr: &discover::NodeAddress,
        cookie: &discover::Cookie,
        cookie_source: CookieSource,
        top: usize,
    ) -> Result<VmView, VmError> {
        let client = VmClient::connect(addr, cookie.expose())?;
        let allocators = query::allocators(&client)?;
        Ok(VmView {
            client,
            allocators,
            top,
            cookie_source,
            found_by: addr.how.clone(),
        })
    }

    /// Where the cookie came from.
    pub fn cookie_source(&self) -> CookieSource {
        self.cookie_source
    }

    /// How the node was found.
    pub fn found_by(&self) -> &str {
        &self.found_by
    }

    /// Node name.
    pub fn node(&self) -> &str {
        self.client.node()
    }

    /// Allocators the node runs without.
    pub fn disabled_allocators(&self) -> &[String] {
        &self.allocators.disabled
    }

    /// Samples the allocators.
    pub fn sample(&self, t_s: f64) -> Result<VmSample, VmError> {
        query::sample(&self.client, &self.allocators.enabled, t_s)
    }

    /// Takes the Erlang-level census.
    pub fn census(&self, t_s: f64) -> Result<Census, VmError> {
        query::census(&self.client, self.top, t_s)
    }

    /// Every carrier by allocator (`instrument:carriers/0`), or a picture saying why not.
    pub fn carrier_picture(&self, t_s: f64) -> Result<CarrierPicture, VmError> {
        query::carrier_picture(&self.client, &self.allocators.enabled, t_s)
    }

    /// The ledger figures of a sample: (vm_used, vm_allocated), `None` when the VM's memory
    /// lives partly outside carriers (allocators disabled) and carriers cannot account for it.
    pub fn ledger_figures(&self, s: &VmSample) -> (Option<u64>, Option<u64>) {
        if self.allocators.disabled.is_empty() {
            (Some(s.used()), Some(s.allocated()))
        } else {
            (None, None)
        }
    }
}

/// What the sampling loop receives from the worker: VM figures for the ledger sample `index`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LedgerFigures {
    /// Index of the ledger sample the request was made for.
    pub index: usize,
    /// vm_used.
    pub used: Option<u64>,
    /// vm_allocated.
    pub allocated: Option<u64>,
}

/// Where the connection stands.
#[derive(Debug)]
enum Status {
    Connecting {
        error: Option<VmError>,
    },
    Live {
        node: String,
        cookie: CookieSource,
    },
    Lost {
        node: String,
        cookie: CookieSource,
        error: VmError,
    },
    Off {
        reason: String,
    },
}

/// State shared by the worker and the loop, under a lock held only for short updates.
#[derive(Debug)]
struct Shared {
    status: Status,
    /// Wall time of the latest census.
    census_cost: Duration,
    evidence: Option<VmEvidence>,
    figures: Vec<LedgerFigures>,
}

struct Request {
    t_s: f64,
    index: usize,
}

/// The VM view of a run, on its own thread.
pub struct VmWorker {
    shared: Arc<Mutex<Shared>>,
    requests: Option<SyncSender<Request>>,
    /// Samples skipped because the worker was busy: the first [`MAX_GAPS`], then a count.
    skipped: Vec<VmGap>,
    skipped_dropped: u64,
    start: Instant,
    done: mpsc::Receiver<()>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmWorker {
    /// Starts the worker for `pid` (None: `--no-vm`, nothing is started).
    pub fn spawn(pid: u32, access: Option<&VmAccess>, start: Instant) -> VmWorker {
        let shared = Arc::new(Mutex::new(Shared {
            status: match access {
                Some(_) => Status::Connecting { error: None },
                None => Status::Off {
                    reason: "VM connection disabled (--no-vm)".into(),
                },
            },
            evidence: None,
            figures: Vec::new(),
            census_cost: Duration::ZERO,
        }));
        let (done_tx, done) = mpsc::channel();
        let mut worker = VmWorker {
            shared: shared.clone(),
            requests: None,
            skipped: Vec::new(),
            skipped_dropped: 0,
            start,
            done,
        };
        let Some(access) = access.cloned() else {
            return worker;
        };
        let (tx, rx) = mpsc::sync_channel::<Request>(1);
        let spawned = thread::Builder::new()
            .name("leaktrace-vm-view".into())
            .spawn(move || {
                run_worker(pid, &access, &shared, &rx, start);
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => worker.requests = Some(tx),
            Err(e) => {
                lock(&worker.shared).status = Status::Off {
                    reason: format!("no VM connection: cannot start its thread: {e}"),
                }
            }
        }
        worker
    }

    /// Asks for the VM figures of ledger sample `index`; never waits. When the worker is still
    /// busy with an earlier call, this sample has no VM figures and the gap is recorded.
    pub fn request(&mut self, t_s: f64, index: usize) {
        let Some(tx) = &self.requests else { return };
        match tx.try_send(Request { t_s, index }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) if self.skipped.len() >= MAX_GAPS => {
                self.skipped_dropped += 1;
            }
            Err(TrySendError::Full(_)) => self.skipped.push(VmGap {
                t_s,
                reason: "the previous call to the node was still running".into(),
            }),
            Err(TrySendError::Disconnected(_)) => self.requests = None,
        }
    }

    /// VM figures that arrived since the last call.
    pub fn take_figures(&mut self) -> Vec<LedgerFigures> {
        std::mem::take(&mut lock(&self.shared).figures)
    }

    /// How long the end of a run should wait for the closing census: a few times what the
    /// last census took, within `[floor, ceiling]`. A node that has grown slow to answer does
    /// not hold the end of the run much past `--duration`.
    pub fn closing_wait(&self, floor: Duration, ceiling: Duration) -> Duration {
        let cost = lock(&self.shared).census_cost;
        (cost * 3 + Duration::from_millis(500)).clamp(floor, ceiling)
    }

    /// Ends the view: waits at most `wait` for the worker to take its closing census, then
    /// returns what was gathered and one note on how the connection went.
    pub fn finish(mut self, wait: Duration) -> VmOutcome {
        // Dropping the sender tells the worker to take its closing census and stop.
        self.requests = None;
        let late = self.done.recv_timeout(wait).is_err();
        let mut shared = lock(&self.shared);
        let mut evidence = shared.evidence.take();
        if let Some(e) = evidence.as_mut() {
            for gap in std::mem::take(&mut self.skipped) {
                e.add_gap(gap.t_s, &gap.reason);
            }
            e.gaps_dropped += self.skipped_dropped;
            e.gaps.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
        }
        let gaps = evidence.as_ref().map_or(0, |e| e.gap_count());
        let kept = evidence.as_ref().map_or(0, |e| e.gaps.len() as u64);
        let gap_note = match gaps {
            0 => String::new(),
            n if n == kept => format!("; {n} samples without VM figures (see vm.gaps)"),
            n => format!(
                "; {n} samples without VM figures (the first {kept} in vm.gaps, and {} more)",
                n - kept
            ),
        };
        let closing = match (late, evidence.as_ref().and_then(|e| e.census_end.as_ref())) {
            (true, Some(c)) => format!(
                "; the node did not answer the closing census within {:.1}s: the census taken at {:.0}s is used",
                wait.as_secs_f64(),
                c.t_s
            ),
            (true, None) => format!(
                "; the node did not answer a census within {:.1}s",
                wait.as_secs_f64()
            ),
            _ => String::new(),
        };
        let t_end = self.start.elapsed().as_secs_f64();
        let note = match &shared.status {
            Status::Live { node, cookie } => format!(
                "VM connection to {node} (found by {}, cookie from {}){gap_note}{closing}",
                evidence.as_ref().map_or("", |e| e.found_by.as_str()),
                cookie.describe()
            ),
            Status::Lost {
                node,
                cookie,
                error,
            } => format!(
                "VM connection to {node} (cookie from {}) stopped answering: {error} (figures up to then kept){gap_note}",
                cookie.describe()
            ),
            Status::Off { reason } => reason.clone(),
            Status::Connecting { error: Some(e) } => format!("no VM connection: {e}"),
            Status::Connecting { error: None } => {
                format!("no VM connection: the run ended ({t_end:.0}s) before the node answered")
            }
        };
        VmOutcome {
            evidence,
            note,
            figures: std::mem::take(&mut shared.figures),
        }
    }
}

/// What the VM view gathered over a run.
#[derive(Debug)]
pub struct VmOutcome {
    /// The VM's figures, when a connection was made.
    pub evidence: Option<VmEvidence>,
    /// How the connection went (for the report's source notes).
    pub note: String,
    /// Ledger figures not yet taken by the loop.
    pub figures: Vec<LedgerFigures>,
}

/// The worker: connects (retrying while a fresh node brings up distribution), answers sample
/// requests, takes censuses spaced by their cost, and a closing census when the loop ends.
fn run_worker(
    pid: u32,
    access: &VmAccess,
    shared: &Mutex<Shared>,
    requests: &mpsc::Receiver<Request>,
    start: Instant,
) {
    let since = Instant::now();
    let mut view: Option<VmView> = None;
    let mut next_census = Instant::now();
    let now_s = || start.elapsed().as_secs_f64();
    loop {
        if view.is_none() {
            match VmView::connect(pid, access) {
                Ok(v) => {
                    let mut s = lock(shared);
                    s.status = Status::Live {
                        node: v.node().to_owned(),
                        cookie: v.cookie_source(),
                    };
                    let evidence = s.evidence.get_or_insert_with(VmEvidence::default);
                    evidence.node = v.node().to_owned();
                    evidence.found_by = v.found_by().to_owned();
                    evidence.disabled_allocators = v.disabled_allocators().to_vec();
                    drop(s);
                    view = Some(v);
                }
                Err(e) => {
                    let permanent = e.is_permanent();
                    let mut s = lock(shared);
                    let had_view = s.evidence.is_some();
                    if matches!(e, VmError::ReplyOverCap { .. }) {
                        // The node answers with more than any real reply holds: asking again
                        // would only repeat it.
                        s.status = Status::Off {
                            reason: over_cap_note(&e, had_view),
                        };
                        return;
                    }
                    if (permanent || since.elapsed() > CONNECT_GRACE) && !had_view {
                        s.status = Status::Off {
                            reason: format!("no VM connection: {e}"),
                        };
                        return;
                    }
                    if let Status::Connecting { error } = &mut s.status {
                        *error = Some(e);
                    }
                }
            }
        }
        let wait = if view.is_some() {
            next_census.saturating_duration_since(Instant::now())
        } else {
            RETRY_EVERY
        };
        let request = match requests.recv_timeout(wait) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                // The run ended: a closing census if the node is with us.
                if let Some(v) = &view {
                    census(v, now_s(), shared, true);
                    carrier_picture(v, now_s(), shared);
                }
                return;
            }
        };
        let Some(v) = &view else { continue };
        if let Some(Request { t_s, index }) = request {
            match v.sample(t_s) {
                Ok(sample) => {
                    let (used, allocated) = v.ledger_figures(&sample);
                    let mut s = lock(shared);
                    s.figures.push(LedgerFigures {
                        index,
                        used,
                        allocated,
                    });
                    if let Some(e) = s.evidence.as_mut() {
                        e.samples.push(sample);
                    }
                    if let Status::Lost { node, cookie, .. } = &s.status {
                        s.status = Status::Live {
                            node: node.clone(),
                            cookie: *cookie,
                        };
                    }
                }
                Err(e) => {
                    let closed = matches!(e, VmError::Call { .. });
                    let mut s = lock(shared);
                    if let Some(ev) = s.evidence.as_mut() {
                        ev.add_gap(t_s, &e.to_string());
                    }
                    if matches!(e, VmError::ReplyOverCap { .. }) {
                        s.status = Status::Off {
                            reason: over_cap_note(&e, true),
                        };
                        return;
                    }
                    s.status = Status::Lost {
                        node: v.node().to_owned(),
                        cookie: v.cookie_source(),
                        error: e,
                    };
                    drop(s);
                    if closed {
                        // The connection may be gone: connect again on the next round.
                        view = None;
                        continue;
                    }
                }
            }
        }
        if Instant::now() >= next_census {
            // The run may have ended while a call was slow: then this is the closing census.
            if let Err(mpsc::TryRecvError::Disconnected) = requests.try_recv() {
                census(v, now_s(), shared, true);
                carrier_picture(v, now_s(), shared);
                return;
            }
            let cost = census(v, now_s(), shared, false);
            if matches!(lock(shared).status, Status::Off { .. }) {
                return;
            }
            lock(shared).census_cost = cost;
            let census_every = CENSUS_MIN_EVERY.max(cost * CENSUS_COST_FACTOR);
            next_census = Instant::now() + census_every;
            if let Some(e) = lock(shared).evidence.as_mut() {
                e.census_every_s = Some(census_every.as_secs_f64());
            }
        }
    }
}

/// Takes a census into the evidence (the first is the start census, the latest the end one);
/// returns what it cost.
fn census(v: &VmView, t_s: f64, shared: &Mutex<Shared>, closing: bool) -> Duration {
    let started = Instant::now();
    let result = v.census(t_s);
    let cost = started.elapsed();
    let mut s = lock(shared);
    let Some(e) = s.evidence.as_mut() else {
        return cost;
    };
    match result {
        Ok(c) if e.census_start.is_none() => e.census_start = Some(c),
        Ok(c) => e.census_end = Some(c),
        Err(err) => {
            e.add_gap(
                t_s,
                &format!(
                    "{} census failed: {err}",
                    if closing { "closing" } else { "periodic" }
                ),
            );
            if matches!(err, VmError::ReplyOverCap { .. }) {
                s.status = Status::Off {
                    reason: over_cap_note(&err, true),
                };
            }
        }
    }
    cost
}

/// Takes the carrier picture into the evidence, once, after the closing census. Until it is
/// in, the evidence says the run's end did not wait for it: a run that ends first keeps that.
fn carrier_picture(v: &VmView, t_s: f64, shared: &Mutex<Shared>) {
    {
        let mut s = lock(shared);
        if matches!(s.status, Status::Off { .. }) {
            return;
        }
        let Some(e) = s.evidence.as_mut() else { return };
        e.carriers = Some(CarrierPicture {
            t_s,
            skipped: Some("the run ended before the node answered instrument:carriers/0".into()),
            ..Default::default()
        });
    }
    let started = Instant::now();
    let picture = v.carrier_picture(t_s).unwrap_or_else(|e| CarrierPicture {
        t_s,
        wall_ms: started.elapsed().as_secs_f64() * 1000.0,
        skipped: Some(cut_text(&format!("instrument:carriers/0 failed: {e}"))),
        ..Default::default()
    });
    if let Some(e) = lock(shared).evidence.as_mut() {
        e.carriers = Some(picture);
    }
}

/// The source note of a view stopped by [`VmError::ReplyOverCap`].
fn over_cap_note(e: &VmError, had_view: bool) -> String {
    if had_view {
        format!("VM connection stopped (figures up to then kept): {e}")
    } else {
        format!("no VM connection: {e}")
    }
}
