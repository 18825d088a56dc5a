//! A throttle group (`--object throttle-group`): one set of limits that
//! every member node shares, scheduled as QEMU schedules its groups.
//!
//! Per direction (reads; writes), a request that must wait is queued on
//! its member, and at most one timer in the group is armed at a time,
//! for the member holding the token. Queued requests go in turns: each
//! one released passes the token round robin to the next member with
//! queued requests, so members with queued requests share the limits
//! evenly. Each member's queue is woken in order (FIFO).
//!
//! A queued request is counted in the buckets when it is released, under
//! the group's lock, and the release goes on at once with the next turn
//! while the limits allow: a timer that fires late releases everything
//! that became due meanwhile, in one go. QEMU does the same on its one
//! thread (a woken coroutine runs, counts itself and wakes the next);
//! here the woken request runs on another thread, and counting it only
//! once it ran would let every hand-off's delay slip out of the buckets
//! (on a busy machine a release chain then crawls at one request per
//! thread wake-up, under the limit).
//!
//! A drained member (export deletion, shutdown, reopen) has its limits
//! lifted: its queued requests go at once, never dropped.
//!
//! A timer runs on the runtime of whoever armed it (the thread of a
//! request of the group), so the requests it releases start there with
//! no hand-off; if that runtime ends first, the timer moves to a thread
//! of its own (`throttle-timers`).
//! A group is not an actor: its state is this struct, which members
//! lock briefly. A timer that fails (a panic, under the lock) is armed
//! again at once, since no other timer of the group would ever be armed
//! and its queued requests would wait for ever.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::algorithm::{Config, Direction, State};

/// Nanoseconds on the monotonic clock the groups share.
fn now_ns() -> i64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    Instant::now().duration_since(epoch).as_nanos() as i64
}

/// The runtime the groups' timers run on (a thread of its own).
fn timers() -> &'static tokio::runtime::Handle {
    static RT: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    RT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("throttle-timers".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("rsd: throttle timers: {e}");
                        return;
                    }
                };
                let _ = tx.send(rt.handle().clone());
                rt.block_on(std::future::pending::<()>());
            });
        match spawned.ok().and_then(|_| rx.recv().ok()) {
            Some(h) => h,
            // Without a thread of their own, timers run on the caller's
            // runtime (they then end with it).
            None => tokio::runtime::Handle::current(),
        }
    })
}

/// What a member has been through, for metrics (read without the lock).
#[derive(Default, Debug)]
pub struct MemberStats {
    /// Requests that had to wait.
    pub throttled: AtomicU64,
    /// Total time requests waited, in nanoseconds.
    pub throttled_ns: AtomicU64,
    /// Requests waiting now.
    pub queued: AtomicU64,
}

/// A request waiting for its turn.
struct Queued {
    ticket: u64,
    /// Its size, counted in the buckets when it is released.
    bytes: u64,
    go: oneshot::Sender<()>,
}

/// One member's place in the group.
struct Slot {
    id: u64,
    node: String,
    /// Requests waiting, per direction, oldest first.
    queue: [VecDeque<Queued>; 2],
    /// The armed timer per direction (its generation).
    timer: [Option<u64>; 2],
    /// Drains under way: limits do not apply meanwhile.
    disabled: usize,
    stats: Arc<MemberStats>,
}

struct Inner {
    state: State,
    /// Members, newest first (QEMU inserts at the head).
    slots: Vec<Slot>,
    /// The member whose turn it is, per direction.
    tokens: [Option<u64>; 2],
    any_timer_armed: [bool; 2],
    next_id: u64,
}

pub struct ThrottleGroup {
    pub name: String,
    inner: Mutex<Inner>,
    /// Test hook (x-rsd-test-crash): the next timer fails.
    crash: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ThrottleGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleGroup")
            .field("name", &self.name)
            .finish()
    }
}

impl Inner {
    fn slot(&mut self, id: u64) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.id == id)
    }
    /// How many requests of `id` wait in `dir`.
    fn queued(&self, id: u64, dir: Direction) -> usize {
        self.slots
            .iter()
            .find(|s| s.id == id)
            .map_or(0, |s| s.queue[dir as usize].len())
    }
    fn disabled(&self, id: u64) -> bool {
        self.slots.iter().any(|s| s.id == id && s.disabled > 0)
    }
    /// The member after `id` in the list, wrapping around.
    fn next_member(&self, id: u64) -> u64 {
        let at = self.slots.iter().position(|s| s.id == id);
        match at {
            Some(i) => self.slots[(i + 1) % self.slots.len()].id,
            None => self.slots.first().map_or(id, |s| s.id),
        }
    }

    /// The next member with queued requests after the current token, or
    /// `id` itself when none has any (QEMU's next_throttle_token).
    fn next_token(&self, id: u64, dir: Direction) -> u64 {
        if self.queued(id, dir) > 0 && self.disabled(id) {
            return id;
        }
        let start = self.tokens[dir as usize].unwrap_or(id);
        let mut token = self.next_member(start);
        while token != start && self.queued(token, dir) == 0 {
            token = self.next_member(token);
        }
        if token == start && self.queued(token, dir) == 0 {
            token = id;
        }
        token
    }

    /// Releases the oldest queued request of `id`, counting it in the
    /// buckets now; false if none waits.
    fn release_front(&mut self, id: u64, dir: Direction) -> bool {
        let Some(s) = self.slot(id) else {
            return false;
        };
        let Some(q) = s.queue[dir as usize].pop_front() else {
            return false;
        };
        // A request whose future was dropped meanwhile is not counted.
        if q.go.send(()).is_ok() {
            self.state.account(dir, q.bytes);
        }
        true
    }
}

impl ThrottleGroup {
    pub fn new(name: &str, cfg: Config) -> Arc<ThrottleGroup> {
        Arc::new(ThrottleGroup {
            name: name.to_string(),
            inner: Mutex::new(Inner {
                state: State::new(cfg, now_ns()),
                slots: Vec::new(),
                tokens: [None, None],
                any_timer_armed: [false, false],
                next_id: 1,
            }),
            crash: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Test hook: the group's armed timer fails when it fires, holding
    /// the group's lock; with none armed, a task on the timer thread
    /// fails under the lock now.
    pub fn crash_timer(self: &Arc<Self>) {
        let armed = self.lock().any_timer_armed.contains(&true);
        self.crash.store(true, Ordering::SeqCst);
        if !armed {
            let group = self.clone();
            timers().spawn(async move {
                let _g = group.lock();
                if group.crash.swap(false, Ordering::SeqCst) {
                    panic!("test hook: throttle group crash requested");
                }
            });
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock leaves plain data: go on with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> Config {
        *self.lock().state.config()
    }

    /// New limits, at once: the buckets start empty (as in QEMU) and
    /// armed timers fire now, so a wait computed under the old limits
    /// does not outlive them (as QEMU's block_set_io_throttle does).
    pub fn set_config(self: &Arc<Self>, cfg: Config) {
        let mut g = self.lock();
        g.state = State::new(cfg, now_ns());
        let armed: Vec<(u64, Direction)> = g
            .slots
            .iter()
            .flat_map(|s| {
                [Direction::Read, Direction::Write]
                    .into_iter()
                    .filter(|d| s.timer[*d as usize].is_some())
                    .map(move |d| (s.id, d))
            })
            .collect();
        for (id, dir) in armed {
            self.fire(&mut g, id, dir);
        }
    }

    /// Node names of the members, newest first.
    pub fn member_nodes(&self) -> Vec<String> {
        self.lock().slots.iter().map(|s| s.node.clone()).collect()
    }

    pub fn in_use(&self) -> bool {
        !self.lock().slots.is_empty()
    }

    /// Each member's node and counters.
    pub fn member_stats(&self) -> Vec<(String, Arc<MemberStats>)> {
        self.lock()
            .slots
            .iter()
            .map(|s| (s.node.clone(), s.stats.clone()))
            .collect()
    }

    /// Joins the group for `node`; leaving is dropping the Member.
    pub fn register(self: &Arc<Self>, node: &str) -> Member {
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id += 1;
        for t in g.tokens.iter_mut() {
            if t.is_none() {
                *t = Some(id);
            }
        }
        let stats = Arc::new(MemberStats::default());
        g.slots.insert(
            0,
            Slot {
                id,
                node: node.to_string(),
                queue: [VecDeque::new(), VecDeque::new()],
                timer: [None, None],
                disabled: 0,
                stats: stats.clone(),
            },
        );
        Member {
            group: self.clone(),
            id,
            stats,
        }
    }

    fn unregister(self: &Arc<Self>, id: u64) {
        let mut g = self.lock();
        for dir in [Direction::Read, Direction::Write] {
            let d = dir as usize;
            if g.tokens[d] == Some(id) {
                let next = g.next_member(id);
                g.tokens[d] = (next != id).then_some(next);
            }
            // A timer of the leaving member: the next member carries on.
            let armed = g.slot(id).is_some_and(|s| s.timer[d].is_some());
            if armed {
                if let Some(s) = g.slot(id) {
                    s.timer[d] = None;
                }
                g.any_timer_armed[d] = false;
            }
            // Nothing should wait here after a drain; if anything does,
            // it goes rather than hang.
            while g.release_front(id, dir) {}
        }
        g.slots.retain(|s| s.id != id);
        if !g.slots.is_empty() {
            for dir in [Direction::Read, Direction::Write] {
                if let Some(t) = g.tokens[dir as usize] {
                    self.schedule_next(&mut g, t, dir);
                }
            }
        }
    }

    /// Arms `id`'s timer for `dir` to fire `wait` ns from now.
    fn arm(self: &Arc<Self>, g: &mut Inner, id: u64, dir: Direction, wait: i64) {
        static GEN: AtomicU64 = AtomicU64::new(1);
        let gen = GEN.fetch_add(1, Ordering::Relaxed);
        let Some(s) = g.slot(id) else {
            return;
        };
        s.timer[dir as usize] = Some(gen);
        Timer {
            group: self.clone(),
            id,
            dir,
            gen,
            deadline: Instant::now() + Duration::from_nanos(wait.max(0) as u64),
            state: TimerState::Waiting,
            on_timer_thread: false,
        }
        .start(tokio::runtime::Handle::try_current().ok());
    }

    fn timer_fired(self: &Arc<Self>, id: u64, dir: Direction, gen: u64) {
        let mut g = self.lock();
        let current = g.slot(id).and_then(|s| s.timer[dir as usize]);
        if current != Some(gen) {
            // Cancelled or replaced.
            return;
        }
        if self.crash.swap(false, Ordering::SeqCst) {
            panic!("test hook: throttle group crash requested");
        }
        self.fire(&mut g, id, dir);
    }

    /// A timer failed while firing: if the turn it held is still armed
    /// (or nothing is armed any more), arm it again to fire at once.
    fn timer_failed(self: &Arc<Self>, id: u64, dir: Direction, gen: u64) {
        let d = dir as usize;
        let mut g = self.lock();
        let current = g.slot(id).map(|s| s.timer[d]);
        let stuck = match current {
            Some(t) => t == Some(gen) || (t.is_none() && !g.any_timer_armed[d]),
            None => {
                // The member left meanwhile: the next one carries on.
                if !g.any_timer_armed[d] {
                    if let Some(t) = g.tokens[d] {
                        self.schedule_next(&mut g, t, dir);
                    }
                }
                false
            }
        };
        if stuck {
            eprintln!(
                "rsd: throttle group {}: a timer failed and was armed again",
                self.name
            );
            g.any_timer_armed[d] = true;
            self.arm(&mut g, id, dir, 0);
        }
    }

    /// The timer's work (now, whether or not it was due): clear it,
    /// release the member's next queued request, then whatever the
    /// limits allow after it.
    fn fire(self: &Arc<Self>, g: &mut Inner, id: u64, dir: Direction) {
        if let Some(s) = g.slot(id) {
            s.timer[dir as usize] = None;
        }
        g.any_timer_armed[dir as usize] = false;
        if g.release_front(id, dir) {
            g.tokens[dir as usize] = Some(id);
        }
        self.schedule_next(g, id, dir);
    }

    /// Whether the token holder's next request must wait; arms its timer
    /// if it must and none is armed in the group (QEMU's
    /// throttle_group_schedule_timer).
    fn must_wait(self: &Arc<Self>, g: &mut Inner, token: u64, dir: Direction) -> bool {
        let d = dir as usize;
        if g.disabled(token) {
            return false;
        }
        if g.any_timer_armed[d] {
            return true;
        }
        let wait = g.state.wait(dir, now_ns());
        if wait <= 0 {
            return false;
        }
        let pending_timer = g.slot(token).is_some_and(|s| s.timer[d].is_some());
        if !pending_timer {
            self.arm(g, token, dir, wait);
        }
        g.tokens[d] = Some(token);
        g.any_timer_armed[d] = true;
        true
    }

    /// After a request of `id` went: release queued requests while the
    /// limits allow, each from the next member in turn, then arm the
    /// timer for the one after (QEMU's schedule_next_request, the woken
    /// requests counted as they are released).
    fn schedule_next(self: &Arc<Self>, g: &mut Inner, mut id: u64, dir: Direction) {
        loop {
            let token = g.next_token(id, dir);
            if g.queued(token, dir) == 0 || self.must_wait(g, token, dir) {
                return;
            }
            g.release_front(token, dir);
            g.tokens[dir as usize] = Some(token);
            id = token;
        }
    }

    /// Lifts `id`'s limits until `drain_end`: its queued requests go now.
    fn drain_begin(self: &Arc<Self>, id: u64) {
        let mut g = self.lock();
        let Some(s) = g.slot(id) else {
            return;
        };
        s.disabled += 1;
        if s.disabled > 1 {
            return;
        }
        for dir in [Direction::Read, Direction::Write] {
            let armed = g.slot(id).is_some_and(|s| s.timer[dir as usize].is_some());
            if armed {
                self.fire(&mut g, id, dir);
            } else {
                g.release_front(id, dir);
                self.schedule_next(&mut g, id, dir);
            }
        }
    }

    fn drain_end(&self, id: u64) {
        let mut g = self.lock();
        if let Some(s) = g.slot(id) {
            s.disabled = s.disabled.saturating_sub(1);
        }
    }
}

/// An armed timer. It runs on the runtime of whoever armed it: that is
/// the thread of the request that must wait (or of the one released
/// last), so when it fires, the requests it releases run there at once,
/// with no hand-off between threads (as QEMU's timers fire in the
/// member's AioContext). If that runtime ends first (a client thread
/// that went away), the timer moves to the groups' own timer thread; if
/// it fails while firing (a panic), it is armed again.
struct Timer {
    group: Arc<ThrottleGroup>,
    id: u64,
    dir: Direction,
    gen: u64,
    deadline: Instant,
    state: TimerState,
    /// On the timer thread, which never ends: nowhere to move to.
    on_timer_thread: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TimerState {
    Waiting,
    Firing,
    Fired,
}

impl Timer {
    /// Runs the timer on `rt`, or on the timer thread when `None`.
    fn start(mut self, rt: Option<tokio::runtime::Handle>) {
        self.on_timer_thread = rt.is_none();
        let mut t = self;
        let run = async move {
            tokio::time::sleep_until(t.deadline.into()).await;
            t.fire();
        };
        // Detached: a JoinHandle dropped leaves its task running.
        match rt {
            Some(h) => drop(h.spawn(run)),
            None => drop(timers().spawn(run)),
        }
    }

    fn fire(&mut self) {
        self.state = TimerState::Firing;
        self.group.timer_fired(self.id, self.dir, self.gen);
        self.state = TimerState::Fired;
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        match self.state {
            TimerState::Fired => {}
            TimerState::Firing => self.group.timer_failed(self.id, self.dir, self.gen),
            TimerState::Waiting if self.on_timer_thread => {}
            TimerState::Waiting => Timer {
                group: self.group.clone(),
                id: self.id,
                dir: self.dir,
                gen: self.gen,
                deadline: self.deadline,
                state: TimerState::Waiting,
                on_timer_thread: true,
            }
            .start(None),
        }
    }
}

/// A node's membership; dropping it leaves the group.
pub struct Member {
    group: Arc<ThrottleGroup>,
    id: u64,
    stats: Arc<MemberStats>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("group", &self.group.name)
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.group.unregister(self.id);
    }
}

/// A queued request; if its future is dropped while queued, it leaves
/// the queue (one already released was counted and stays counted).
struct Waiting<'a> {
    member: &'a Member,
    dir: Direction,
    ticket: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut g = self.member.group.lock();
        if let Some(s) = g.slot(self.member.id) {
            s.queue[self.dir as usize].retain(|q| q.ticket != self.ticket);
        }
        self.member.stats.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Member {
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    pub fn stats(&self) -> &Arc<MemberStats> {
        &self.stats
    }

    /// Waits until a request of `bytes` in `dir` may go; it is counted
    /// when it goes (QEMU's throttle_group_co_io_limits_intercept).
    pub async fn intercept(&self, bytes: u64, dir: Direction) {
        let group = &self.group;
        let rx = {
            let mut g = group.lock();
            // A drained member's requests go at once, whoever's turn it is.
            let drained = g.disabled(self.id);
            let token = g.next_token(self.id, dir);
            let wait =
                !drained && (group.must_wait(&mut g, token, dir) || g.queued(self.id, dir) > 0);
            if !wait {
                g.state.account(dir, bytes);
                group.schedule_next(&mut g, self.id, dir);
                return;
            }
            static TICKET: AtomicU64 = AtomicU64::new(1);
            let ticket = TICKET.fetch_add(1, Ordering::Relaxed);
            let (go, rx) = oneshot::channel();
            match g.slot(self.id) {
                Some(s) => {
                    s.queue[dir as usize].push_back(Queued { ticket, bytes, go });
                    (ticket, rx)
                }
                // Not a member any more (cannot happen while `self`
                // lives): nothing to wait for.
                None => return,
            }
        };
        let (ticket, rx) = rx;
        let started = Instant::now();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.stats.throttled.fetch_add(1, Ordering::Relaxed);
        let mut w = Waiting {
            member: self,
            dir,
            ticket,
            done: false,
        };
        // Released (and counted) by whoever gave it its turn.
        let _ = rx.await;
        w.done = true;
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .throttled_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Starts a drained section: limits lifted, queued requests go.
    pub fn drain_begin(&self) {
        self.group.drain_begin(self.id);
    }

    pub fn drain_end(&self) {
        self.group.drain_end(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::super::algorithm::{Bucket, Limit};
    use super::*;

    fn iops(n: u64) -> Config {
        let mut c = Config::default();
        *c.get_mut(Bucket::OpsTotal) = Limit {
            avg: n,
            max: 0,
            burst_length: 1,
        };
        c
    }

    /// `n` requests at a time through `m` until `until`; returns how
    /// many went.
    async fn load(m: Arc<Member>, depth: usize, until: Instant) -> u64 {
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..depth {
            let (m, done) = (m.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    m.intercept(4096, Direction::Read).await;
                    // Those still queued at the end do not count.
                    if Instant::now() < until {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        done.load(Ordering::Relaxed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_member_gets_the_limit() {
        let g = ThrottleGroup::new("g", iops(200));
        let m = Arc::new(g.register("a"));
        let until = Instant::now() + Duration::from_secs(2);
        let n = load(m.clone(), 64, until).await;
        // 2 s at 200/s plus the initial tenth of a second's worth.
        assert!((390..=430).contains(&n), "{n}");
        assert!(m.stats().throttled.load(Ordering::Relaxed) > 300);
        assert_eq!(m.stats().queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_members_share_fairly() {
        let g = ThrottleGroup::new("g", iops(300));
        let a = Arc::new(g.register("a"));
        let b = Arc::new(g.register("b"));
        assert_eq!(g.member_nodes(), ["b", "a"]);
        let until = Instant::now() + Duration::from_secs(2);
        // a sends twice as many at once as b: turns keep them even.
        let (na, nb) = tokio::join!(load(a.clone(), 64, until), load(b.clone(), 32, until));
        let total = na + nb;
        assert!((570..=660).contains(&total), "{na} + {nb}");
        let share = na as f64 / total as f64;
        assert!((0.45..=0.55).contains(&share), "{na} vs {nb}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_lets_queued_requests_go_at_once() {
        let g = ThrottleGroup::new("g", iops(1));
        let m = Arc::new(g.register("a"));
        // The first goes (the bucket holds a little), the rest queue.
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                m.intercept(4096, Direction::Write).await;
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while m.stats().queued.load(Ordering::Relaxed) < 4 {
            assert!(Instant::now() < deadline, "requests never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t0 = Instant::now();
        m.drain_begin();
        for t in tasks {
            t.await.expect("request");
        }
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        m.drain_end();
        assert_eq!(m.stats().queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_limits_apply_at_once_and_leaving_frees_the_group() {
        let g = ThrottleGroup::new("g", iops(1));
        let m = Arc::new(g.register("a"));
        m.intercept(1, Direction::Read).await;
        let m2 = m.clone();
        let waiting = tokio::spawn(async move { m2.intercept(1, Direction::Read).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        g.set_config(iops(1000));
        tokio::time::timeout(Duration::from_millis(500), waiting)
            .await
            .expect("the new limit applied at once")
            .expect("task");
        assert!(g.in_use());
        drop(m);
        assert!(!g.in_use());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_waiter_passes_its_turn_on() {
        let g = ThrottleGroup::new("g", iops(5));
        let m = Arc::new(g.register("a"));
        m.intercept(1, Direction::Read).await;
        let m2 = m.clone();
        let first = tokio::spawn(async move { m2.intercept(1, Direction::Read).await });
        let m3 = m.clone();
        let second = tokio::spawn(async move { m3.intercept(1, Direction::Read).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        tokio::time::timeout(Duration::from_secs(2), second)
            .await
            .expect("the second request still went")
            .expect("task");
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timer_outlives_the_runtime_that_armed_it() {
        let g = ThrottleGroup::new("g", iops(5));
        let m = Arc::new(g.register("a"));
        m.intercept(1, Direction::Read).await;
        // A request on a runtime of its own must wait: the timer is
        // armed there. Once a second request waits behind it, that
        // runtime ends, taking its request and the timer's task along.
        let (m2, stats) = (m.clone(), m.stats().clone());
        let other = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let first = tokio::spawn(async move { m2.intercept(1, Direction::Read).await });
                let deadline = Instant::now() + Duration::from_secs(5);
                while stats.queued.load(Ordering::Relaxed) < 2 {
                    assert!(Instant::now() < deadline, "requests never queued");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                assert!(!first.is_finished());
            });
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while m.stats().queued.load(Ordering::Relaxed) < 1 {
            assert!(Instant::now() < deadline, "the first request never queued");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let m3 = m.clone();
        let second = tokio::spawn(async move { m3.intercept(1, Direction::Read).await });
        other.join().expect("the other runtime");
        // The timer went on on the timer thread and let the second go.
        tokio::time::timeout(Duration::from_secs(3), second)
            .await
            .expect("the second request went")
            .expect("task");
        assert_eq!(m.stats().queued.load(Ordering::Relaxed), 0);
    }

    /// A timer that fails under the group's lock (x-rsd-test-crash on
    /// the group) is armed again: the requests it held back still go,
    /// and so do later ones. Before, the group kept that timer marked as
    /// armed and never armed another: every request queued for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_timer_is_armed_again() {
        let g = ThrottleGroup::new("g", iops(20));
        let m = Arc::new(g.register("a"));
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                m.intercept(4096, Direction::Write).await;
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while m.stats().queued.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "requests never queued");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        g.crash_timer();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("a queued request waited for ever")
                .expect("task");
        }
        assert!(!g.crash.load(Ordering::SeqCst), "the timer did fail");
        // With nothing armed, the hook fails a task under the lock now;
        // the group goes on.
        g.crash_timer();
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.crash.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the hook never ran");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), m.intercept(1, Direction::Read))
            .await
            .expect("a request after the crash");
    }
}
