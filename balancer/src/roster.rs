//! The live proxy set (SPEC 7): the specs it comes from (`--proxies`, `--proxies-file`), the
//! last good addresses of each DNS name, and the slots of the balancer's proxies.
//!
//! A proxy keeps its slot (its index in the backends) for as long as it is a member, so
//! attempts, connections and timers that name it stay right across a reload. A removed
//! proxy's slot is `Leaving` while GETs or exchanges still use it, then `Free`, and is taken
//! again by the next proxy added — with a new generation, so that the old proxy's timers do
//! not drive the new one. Routing sees only the `Active` slots, packed, so under
//! `consistent_hash` a key's proxy depends on the key and the set alone.
//!
//! Plain state over the backends: no sockets, no clock; the loop glue is `reconfig`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::backend::{Backend, SlotState};
use crate::membership::{members, plan, read_file, Host, Member, ProxySpec};
use crate::strategy::{Candidate, Router, MAX_PROXIES};
use crate::BalancerConfig;

/// What one change of the set did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Slots with a new occupant (or one taken back): their probe and poll timers start.
    pub started: Vec<usize>,
    pub added: usize,
    pub removed: usize,
}

#[derive(Debug, Default)]
pub struct Roster {
    /// From `--proxies`: fixed for the process's life (their names are re-resolved).
    fixed: Vec<ProxySpec>,
    file: Option<PathBuf>,
    from_file: Vec<ProxySpec>,
    /// Each name's last good answer; a failed lookup leaves it as it was.
    resolved: BTreeMap<(String, u16), Vec<SocketAddr>>,
    /// Slots removed by a reload and still in use.
    pub leaving: Vec<usize>,
    next_generation: u64,
}

impl Roster {
    /// The set the balancer starts with is `config.proxies` (resolved before the loop runs).
    pub fn new(config: &BalancerConfig) -> Roster {
        let mut resolved: BTreeMap<(String, u16), Vec<SocketAddr>> = BTreeMap::new();
        for m in &config.proxies {
            if let Some(name) = &m.name {
                resolved.entry((name.clone(), m.addr.port())).or_default().push(m.addr);
            }
        }
        let mut fixed = config.specs.clone();
        if fixed.is_empty() && config.proxies_file.is_none() {
            // Built in code from addresses alone (tests, embedders).
            fixed =
                config.proxies.iter().map(|m| ProxySpec { host: Host::Ip(m.addr.ip()), port: m.addr.port() }).collect();
        }
        Roster {
            fixed,
            file: config.proxies_file.clone(),
            from_file: config.file_specs.clone(),
            resolved,
            leaving: Vec::new(),
            next_generation: 1,
        }
    }

    fn specs(&self) -> impl Iterator<Item = &ProxySpec> {
        self.fixed.iter().chain(&self.from_file)
    }

    /// The DNS names to look up, with their ports.
    pub fn names(&self) -> Vec<(String, u16)> {
        let mut names: Vec<(String, u16)> =
            self.specs().filter_map(|s| s.name().map(|n| (n.to_owned(), s.port))).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether some name has no answer yet (it failed at start-up, or is new).
    pub fn has_unresolved(&self) -> bool {
        self.names().iter().any(|key| !self.resolved.contains_key(key))
    }

    /// Whether a resolver thread may be needed: names now, or a file that may bring some.
    pub fn may_need_resolver(&self) -> bool {
        self.file.is_some() || !self.names().is_empty()
    }

    /// Takes one name's answer: a non-empty list replaces the last one; an error or an
    /// empty answer keeps it (a DNS outage must not empty the set). Returns the reason a
    /// lookup failed, for the log.
    pub fn resolved(&mut self, name: String, port: u16, answer: Result<Vec<SocketAddr>, String>) -> Option<String> {
        match answer {
            Ok(addrs) if !addrs.is_empty() => {
                self.resolved.insert((name, port), addrs);
                None
            }
            Ok(_) => Some(format!("{name}: no addresses; keeping the last ones")),
            Err(e) => Some(format!("{name}: {e}; keeping the last addresses")),
        }
    }

    fn desired(&self, specs: &[ProxySpec]) -> Vec<Member> {
        members(specs, |name, port| self.resolved.get(&(name.to_owned(), port)).cloned())
    }

    /// Makes the backends the set the specs give now (after a lookup answered).
    pub fn refresh(&mut self, backends: &mut Vec<Backend>, config: &BalancerConfig) -> Result<Applied, String> {
        let specs: Vec<ProxySpec> = self.specs().cloned().collect();
        let desired = self.desired(&specs);
        self.apply(backends, &desired, config)
    }

    /// SIGHUP: re-reads the file and swaps the set in, or changes nothing and says why.
    pub fn reload(&mut self, backends: &mut Vec<Backend>, config: &BalancerConfig) -> Result<Applied, String> {
        let from_file = match &self.file {
            Some(path) => read_file(path).map_err(|e| format!("{}: {e}", path.display()))?,
            None => self.from_file.clone(),
        };
        let specs: Vec<ProxySpec> = self.fixed.iter().chain(&from_file).cloned().collect();
        if specs.is_empty() {
            return Err("the new set lists no proxies".into());
        }
        let desired = self.desired(&specs);
        let applied = if desired.is_empty() && specs.iter().any(|s| s.name().is_some()) {
            // Only names not looked up yet: the set changes when their answers come.
            Applied::default()
        } else {
            self.apply(backends, &desired, config)?
        };
        self.from_file = from_file;
        let names = self.names();
        self.resolved.retain(|key, _| names.contains(key));
        Ok(applied)
    }

    /// Replaces the set with `desired`: proxies in both keep their slot and all it holds;
    /// new ones take a free slot (or a new one); removed ones start leaving. Nothing changes
    /// when the result would be empty or would not fit in [`MAX_PROXIES`] slots.
    pub fn apply(
        &mut self,
        backends: &mut Vec<Backend>,
        desired: &[Member],
        config: &BalancerConfig,
    ) -> Result<Applied, String> {
        if desired.is_empty() {
            return Err("no proxy addresses (kept the current set)".into());
        }
        let current: Vec<SocketAddr> = backends.iter().filter(|b| b.present()).map(|b| b.addr).collect();
        let p = plan(&current, desired);
        let free = backends.iter().filter(|b| b.state == SlotState::Free).count() + MAX_PROXIES - backends.len();
        if p.add.len() > free {
            return Err(format!("more than {MAX_PROXIES} proxies, counting those still draining"));
        }
        let mut applied = Applied { added: p.add.len(), removed: p.remove.len(), ..Applied::default() };
        let slot_of =
            |backends: &[Backend], addr: SocketAddr| backends.iter().position(|b| b.present() && b.addr == addr);
        for addr in &p.keep {
            let Some(slot) = slot_of(backends, *addr) else { continue };
            if let Some(m) = desired.iter().find(|m| m.addr == *addr) {
                backends[slot].dns_name.clone_from(&m.name);
            }
            if backends[slot].state == SlotState::Leaving {
                // Taken back before it had left: it serves again, with fresh timers.
                backends[slot].state = SlotState::Active;
                backends[slot].generation = self.take_generation();
                self.leaving.retain(|s| *s != slot);
                applied.started.push(slot);
            }
        }
        for addr in &p.remove {
            let Some(slot) = slot_of(backends, *addr) else { continue };
            backends[slot].state = SlotState::Leaving;
            if !self.leaving.contains(&slot) {
                self.leaving.push(slot);
            }
        }
        for m in p.add {
            let backend = Backend::new(m.addr, m.name, self.take_generation(), config);
            let slot = match backends.iter().position(|b| b.state == SlotState::Free) {
                Some(slot) => {
                    backends[slot] = backend;
                    slot
                }
                None => {
                    backends.push(backend);
                    backends.len() - 1
                }
            };
            applied.started.push(slot);
        }
        Ok(applied)
    }

    /// A generation for a new occupant of a slot (start-up proxies have 0).
    fn take_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

/// Picks a proxy for `key` among the slots that take new GETs. `tried` names slots; the
/// router sees the routable ones packed (`slots` maps back), so routing depends only on the
/// key and the set, never on where free or leaving slots sit.
pub fn pick(
    router: &mut Router,
    backends: &[Backend],
    (candidates, slots): (&mut Vec<Candidate>, &mut Vec<usize>),
    key: &str,
    tried: u128,
) -> Option<usize> {
    candidates.clear();
    slots.clear();
    let mut packed_tried = 0u128;
    for (slot, b) in backends.iter().enumerate().take(MAX_PROXIES).filter(|(_, b)| b.routable()) {
        if tried >> slot & 1 == 1 {
            packed_tried |= 1u128 << candidates.len();
        }
        slots.push(slot);
        candidates.push(b.candidate());
    }
    router.pick(key, candidates, packed_tried).and_then(|i| slots.get(i).copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Kind;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::new([10, 0, 0, i].into(), 8001)
    }

    fn config(n: u8) -> BalancerConfig {
        BalancerConfig::new(&(1..=n).map(addr).collect::<Vec<_>>())
    }

    fn backends(config: &BalancerConfig) -> Vec<Backend> {
        config.proxies.iter().map(|m| Backend::new(m.addr, m.name.clone(), 0, config)).collect()
    }

    fn set(addrs: impl IntoIterator<Item = u8>) -> Vec<Member> {
        addrs.into_iter().map(|i| Member { addr: addr(i), name: None }).collect()
    }

    fn owners(backends: &[Backend], keys: usize) -> Vec<SocketAddr> {
        let mut router = Router::new(Kind::ConsistentHash { load_factor: 1.25 });
        let (mut c, mut s) = (Vec::new(), Vec::new());
        (0..keys)
            .map(|k| {
                let slot = pick(&mut router, backends, (&mut c, &mut s), &format!("key-{k}"), 0).unwrap_or(usize::MAX);
                backends.get(slot).map_or(addr(0), |b| b.addr)
            })
            .collect()
    }

    #[test]
    fn stayers_keep_their_slot_and_state_removed_ones_leave_new_ones_take_free_slots() {
        let config = config(3);
        let mut roster = Roster::new(&config);
        let mut b = backends(&config);
        b[1].forwarded = 7;
        let applied = roster.apply(&mut b, &set([2, 3, 4]), &config);
        assert_eq!(applied, Ok(Applied { started: vec![3], added: 1, removed: 1 }));
        assert_eq!((b[1].addr, b[1].forwarded, b[1].state), (addr(2), 7, SlotState::Active));
        assert_eq!(b[0].state, SlotState::Leaving);
        assert_eq!(roster.leaving, [0]);
        // Once it has left, its slot goes to the next newcomer, with a new generation.
        b[0].state = SlotState::Free;
        roster.leaving.clear();
        let applied = roster.apply(&mut b, &set([2, 3, 4, 5]), &config);
        assert_eq!(applied.map(|a| a.started), Ok(vec![0]));
        assert_eq!((b[0].addr, b.len()), (addr(5), 4));
        assert!(b[0].generation > b[3].generation);
        // A leaving proxy listed again is taken back in its own slot.
        assert_eq!(roster.apply(&mut b, &set([2, 3, 4]), &config).map(|a| a.removed), Ok(1));
        assert_eq!(roster.apply(&mut b, &set([2, 3, 4, 5]), &config).map(|a| (a.started, a.added)), Ok((vec![0], 0)));
        assert_eq!(b[0].state, SlotState::Active);
        assert!(roster.leaving.is_empty());
    }

    #[test]
    fn an_empty_or_oversized_set_changes_nothing() {
        let config = config(2);
        let mut roster = Roster::new(&config);
        let mut b = backends(&config);
        assert!(roster.apply(&mut b, &[], &config).is_err());
        let many: Vec<Member> = (0..=MAX_PROXIES)
            .map(|i| Member { addr: SocketAddr::new([10, 1, 0, 0].into(), 1000 + i as u16), name: None })
            .collect();
        assert!(roster.apply(&mut b, &many, &config).is_err());
        assert!(b.iter().all(|b| b.state == SlotState::Active) && b.len() == 2);
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_addresses() {
        let mut roster = Roster::default();
        assert_eq!(roster.resolved("p.test".into(), 1, Ok(vec![addr(1)])), None);
        assert!(roster.resolved("p.test".into(), 1, Err("timed out".into())).is_some());
        assert!(roster.resolved("p.test".into(), 1, Ok(vec![])).is_some());
        let spec = ProxySpec { host: Host::Name("p.test".into()), port: 1 };
        assert_eq!(roster.desired(&[spec]).len(), 1);
    }

    /// SPEC 7: under consistent_hash only the keys of an added proxy move (to it), and only
    /// the keys of a removed one (away from it); leaving and free slots change nothing.
    #[test]
    fn adding_a_fifth_proxy_to_four_moves_only_its_share() {
        const KEYS: usize = 10_000;
        let config = config(4);
        let mut roster = Roster::new(&config);
        let mut b = backends(&config);
        let before = owners(&b, KEYS);
        assert!(roster.apply(&mut b, &set([1, 2, 3, 4, 5]), &config).is_ok());
        let after = owners(&b, KEYS);
        let moved: Vec<usize> = (0..KEYS).filter(|&k| before[k] != after[k]).collect();
        assert!(moved.iter().all(|&k| after[k] == addr(5)), "a key moved between two old proxies");
        println!("keys moved adding a fifth proxy to four: {} of {KEYS}", moved.len());
        // An even share is 2,000; rendezvous hashing over 5 proxies stays near it.
        assert!((1_500..=2_500).contains(&moved.len()), "{} keys moved", moved.len());
        // Removing proxy 2 moves only its keys; where its slot sits does not matter.
        assert!(roster.apply(&mut b, &set([1, 3, 4, 5]), &config).is_ok());
        assert_eq!(b[1].state, SlotState::Leaving, "still draining, not yet free");
        let removed = owners(&b, KEYS);
        assert!((0..KEYS).all(|k| removed[k] == after[k] || after[k] == addr(2)));
        assert!(removed.iter().all(|a| *a != addr(2)));
        // The same set built fresh, in another order, routes every key the same way.
        let fresh_config = BalancerConfig::new(&[addr(5), addr(4), addr(3), addr(1)]);
        assert_eq!(owners(&backends(&fresh_config), KEYS), removed);
    }
}
