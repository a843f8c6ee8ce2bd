//! The VM view during a run: connects (retrying while a freshly started node brings up
//! distribution), samples allocators every interval, takes the census at start and end, and
//! says exactly why when any of it is missing.

use std::time::{Duration, Instant};

use crate::{
    config::VmAccess,
    recording::VmEvidence,
    target,
    vm::{
        VmClient, VmError,
        discover::{self, CookieSource},
        snapshot::{self, Census, VmSample},
    },
};

/// How long a node may take to answer its first connection (a `run` node boots first).
const CONNECT_GRACE: Duration = Duration::from_secs(15);
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A connected VM and what it reported so far.
#[derive(Debug)]
pub struct VmView {
    client: VmClient,
    allocators: Vec<String>,
    top: usize,
    cookie_source: CookieSource,
    evidence: VmEvidence,
}

impl VmView {
    /// Finds the node name and cookie for `pid` and connects.
    pub fn connect(pid: u32, access: &VmAccess) -> Result<VmView, VmError> {
        let cmdline = target::read_cmdline(pid).unwrap_or_default();
        let node = match &access.node {
            Some(n) => n.clone(),
            None => discover::node_from_cmdline(&cmdline, &discover::hostname())
                .ok_or(VmError::NotDistributed)?,
        };
        let (cookie, cookie_source) = discover::find_cookie(
            pid,
            &cmdline,
            access.cookie.as_ref(),
            access.cookie_file.as_ref(),
        )?;
        VmView::connect_node(&node, &cookie, cookie_source, access.top)
    }

    /// Connects to `node` with `cookie`.
    pub fn connect_node(
        node: &str,
        cookie: &discover::Cookie,
        cookie_source: CookieSource,
        top: usize,
    ) -> Result<VmView, VmError> {
        let client = VmClient::connect(node, cookie.expose())?;
        let allocators = snapshot::allocator_names(&client)?;
        Ok(VmView {
            evidence: VmEvidence {
                node: node.to_owned(),
                ..Default::default()
            },
            client,
            allocators,
            top,
            cookie_source,
        })
    }

    /// Where the cookie came from.
    pub fn cookie_source(&self) -> CookieSource {
        self.cookie_source
    }

    /// Node name.
    pub fn node(&self) -> &str {
        self.client.node()
    }

    /// Samples the allocators and keeps the sample.
    pub fn sample(&mut self, t_s: f64) -> Result<&VmSample, VmError> {
        let s = snapshot::sample(&self.client, &self.allocators, t_s)?;
        self.evidence.samples.push(s);
        Ok(self.evidence.samples.last().expect("just pushed"))
    }

    /// Takes the Erlang-level census.
    pub fn census(&self, t_s: f64) -> Result<Census, VmError> {
        snapshot::census(&self.client, self.top, t_s)
    }

    /// Records the census taken at the start of the run.
    pub fn set_census_start(&mut self, c: Census) {
        self.evidence.census_start = Some(c);
    }

    /// Ends the view, taking the closing census if the node still answers.
    pub fn finish(mut self, t_s: f64) -> (VmEvidence, Option<VmError>) {
        match self.census(t_s) {
            Ok(c) => {
                self.evidence.census_end = Some(c);
                (self.evidence, None)
            }
            Err(e) => (self.evidence, Some(e)),
        }
    }
}

/// Connection state over a run.
#[derive(Debug)]
pub enum VmState {
    /// Not wanted (`--no-vm`), given up, or lost: the reason for the report, and what was
    /// gathered before a connection was lost.
    Off {
        /// Why there is no (more) VM view.
        reason: String,
        /// Figures gathered before the connection was lost.
        evidence: Option<VmEvidence>,
    },
    /// Still trying (a node that is booting).
    Connecting {
        /// Access options.
        access: VmAccess,
        /// When trying started.
        since: Instant,
        /// Last attempt.
        last: Option<Instant>,
        /// Last failure.
        error: Option<VmError>,
    },
    /// Connected.
    Live(Box<VmView>),
}

impl VmState {
    /// Starts in `Connecting`, or `Off` when disabled.
    pub fn new(access: Option<&VmAccess>) -> VmState {
        match access {
            None => VmState::Off {
                reason: "VM connection disabled (--no-vm)".into(),
                evidence: None,
            },
            Some(a) => VmState::Connecting {
                access: a.clone(),
                since: Instant::now(),
                last: None,
                error: None,
            },
        }
    }

    /// Tries to connect if it is time; gives up after the grace period, or at once on errors
    /// that retrying cannot fix (not distributed, no cookie, wrong cookie).
    pub fn poll_connect(&mut self, pid: u32, t_s: f64) {
        let VmState::Connecting {
            access,
            since,
            last,
            error,
        } = self
        else {
            return;
        };
        if last.is_some_and(|l| l.elapsed() < RETRY_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        match VmView::connect(pid, access) {
            Ok(mut view) => {
                match view.census(t_s) {
                    Ok(c) => view.set_census_start(c),
                    Err(e) => log::warn!("census at start failed: {e}"),
                }
                *self = VmState::Live(Box::new(view));
            }
            Err(e) => {
                let permanent = matches!(
                    e,
                    VmError::NotDistributed | VmError::NoCookie | VmError::Refused { .. }
                );
                if permanent || since.elapsed() > CONNECT_GRACE {
                    *self = VmState::Off {
                        reason: format!("no VM connection: {e}"),
                        evidence: None,
                    };
                } else {
                    *error = Some(e);
                }
            }
        }
    }

    /// Samples when live: (vm_used, vm_allocated). A node that stops answering is dropped
    /// with the reason kept.
    pub fn sample(&mut self, t_s: f64) -> Option<(u64, u64)> {
        let VmState::Live(view) = self else {
            return None;
        };
        match view.sample(t_s) {
            Ok(s) => Some((s.used(), s.allocated())),
            Err(e) => {
                let reason = format!(
                    "VM connection to {} lost at {t_s:.0}s: {e} (figures up to then kept)",
                    view.node()
                );
                let VmState::Live(view) = std::mem::replace(
                    self,
                    VmState::Off {
                        reason,
                        evidence: None,
                    },
                ) else {
                    unreachable!("matched Live above")
                };
                if let VmState::Off { evidence, .. } = self {
                    *evidence = Some(view.evidence);
                }
                None
            }
        }
    }

    /// Ends the run: the evidence gathered and the note explaining what is missing, if anything.
    pub fn finish(self, t_s: f64) -> (Option<VmEvidence>, Option<String>) {
        match self {
            VmState::Live(view) => {
                let node = view.node().to_owned();
                let source = view.cookie_source().describe();
                let (evidence, err) = view.finish(t_s);
                let note = match err {
                    Some(e) => format!(
                        "VM connection to {node} (cookie from {source}): closing census failed: {e}"
                    ),
                    None => format!("VM connection to {node} (cookie from {source})"),
                };
                (Some(evidence), Some(note))
            }
            VmState::Off { reason, evidence } => (evidence, Some(reason)),
            VmState::Connecting { error, .. } => (
                None,
                Some(match error {
                    Some(e) => format!("no VM connection: {e}"),
                    None => "no VM connection: the run ended before the node answered".into(),
                }),
            ),
        }
    }

    /// Whether connected.
    pub fn is_live(&self) -> bool {
        matches!(self, VmState::Live(_))
    }
}
