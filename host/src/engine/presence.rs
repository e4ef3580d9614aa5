//! Guest presence as a state machine, not a boolean.
//!
//! `unknown` → `booting` (the VM was started, no HELLO yet) → `alive` (a message
//! from the guest agent) → `suspect` (no beacon for 3 intervals) → `lost` (none for
//! 4.5 intervals) → `gone` (BYE, or the VM is off). Any message from the guest makes
//! it `alive` again. While the VM is known to be paused, silence is expected and
//! presence does not degrade. Each change keeps its time, so a caller can tell "the
//! VM is not running" from "the agent has not started yet" from "the guest stopped
//! answering". Pure logic: the VM actor feeds it events and the clock.

use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio::time::Instant;

/// Where a guest agent stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Presence {
    Unknown,
    Booting,
    Alive,
    Suspect,
    Lost,
    Gone,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Unknown => "unknown",
            Presence::Booting => "booting",
            Presence::Alive => "alive",
            Presence::Suspect => "suspect",
            Presence::Lost => "lost",
            Presence::Gone => "gone",
        }
    }

    pub fn parse(text: &str) -> Option<Presence> {
        [
            Presence::Unknown,
            Presence::Booting,
            Presence::Alive,
            Presence::Suspect,
            Presence::Lost,
            Presence::Gone,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// The tracker of one guest's presence.
#[derive(Clone, Debug)]
pub struct PresenceTracker {
    state: Presence,
    since: DateTime<Utc>,
    last_heard: Option<Instant>,
    last_heard_at: Option<DateTime<Utc>>,
    interval: Duration,
    paused: bool,
}

impl PresenceTracker {
    /// A tracker for beacons every `interval` (the guests' `beacon_interval`).
    pub fn new(interval: Duration) -> PresenceTracker {
        PresenceTracker {
            state: Presence::Unknown,
            since: Utc::now(),
            last_heard: None,
            last_heard_at: None,
            interval,
            paused: false,
        }
    }

    /// Restores a state read from the store (after a restart nothing was heard yet:
    /// the silence clock starts now, so a live guest is not declared lost at once).
    pub fn restore(&mut self, state: Presence, since: DateTime<Utc>) {
        self.state = state;
        self.since = since;
        if matches!(state, Presence::Alive | Presence::Suspect) {
            self.last_heard = Some(Instant::now());
        }
    }

    pub fn state(&self) -> Presence {
        self.state
    }

    pub fn since(&self) -> DateTime<Utc> {
        self.since
    }

    pub fn last_heard_at(&self) -> Option<DateTime<Utc>> {
        self.last_heard_at
    }

    fn set(&mut self, state: Presence) -> bool {
        if self.state == state {
            return false;
        }
        self.state = state;
        self.since = Utc::now();
        true
    }

    /// The VM was started: the agent has yet to say HELLO. Returns whether it changed.
    pub fn vm_started(&mut self) -> bool {
        self.paused = false;
        match self.state {
            Presence::Alive | Presence::Suspect => false,
            _ => self.set(Presence::Booting),
        }
    }

    /// The VM stopped (powered off, saved, aborted): the agent is gone.
    pub fn vm_stopped(&mut self) -> bool {
        self.paused = false;
        self.set(Presence::Gone)
    }

    /// The VM was paused or resumed: silence is expected while paused.
    pub fn vm_paused(&mut self, paused: bool) {
        let resumed = self.paused && !paused;
        self.paused = paused;
        // Only a real pause → run transition restarts the silence clock (the VM actor
        // reports "running" every second; that must not keep a silent guest alive).
        if resumed && self.last_heard.is_some() {
            self.last_heard = Some(Instant::now());
        }
    }

    /// Anything from the guest agent (HELLO, STILL_ALIVE, replies).
    pub fn heard(&mut self) -> bool {
        self.last_heard = Some(Instant::now());
        self.last_heard_at = Some(Utc::now());
        self.set(Presence::Alive)
    }

    /// The guest said BYE.
    pub fn bye(&mut self) -> bool {
        self.set(Presence::Gone)
    }

    /// Re-evaluates silence at `now`. Returns whether the state changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        if self.paused {
            return false;
        }
        let (Some(last), Presence::Alive | Presence::Suspect) = (self.last_heard, self.state)
        else {
            return false;
        };
        let silent = now.saturating_duration_since(last);
        if silent >= self.interval.mul_f64(4.5) {
            self.set(Presence::Lost)
        } else if silent >= self.interval * 3 {
            self.set(Presence::Suspect)
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_makes_a_guest_suspect_then_lost_and_a_beacon_revives_it() {
        let mut p = PresenceTracker::new(Duration::from_secs(10));
        assert_eq!(p.state(), Presence::Unknown);
        assert!(p.vm_started());
        assert_eq!(p.state(), Presence::Booting);
        p.heard();
        assert_eq!(p.state(), Presence::Alive);
        let start = Instant::now();
        assert!(!p.tick(start + Duration::from_secs(29)));
        assert!(p.tick(start + Duration::from_secs(31)));
        assert_eq!(p.state(), Presence::Suspect);
        assert!(p.tick(start + Duration::from_secs(46)));
        assert_eq!(p.state(), Presence::Lost);
        p.heard();
        assert_eq!(p.state(), Presence::Alive);
        assert!(p.bye());
        assert_eq!(p.state(), Presence::Gone);
    }

    #[test]
    fn a_paused_vm_is_not_declared_lost() {
        let mut p = PresenceTracker::new(Duration::from_secs(1));
        p.heard();
        p.vm_paused(true);
        assert!(!p.tick(Instant::now() + Duration::from_secs(100)));
        assert_eq!(p.state(), Presence::Alive);
        p.vm_paused(false);
        assert!(!p.tick(Instant::now() + Duration::from_secs(2)));
    }

    #[test]
    fn a_running_vm_reported_again_and_again_does_not_keep_a_silent_guest_alive() {
        // Regression: the VM actor's tick reports "running" every second.
        let mut p = PresenceTracker::new(Duration::from_millis(10));
        p.heard();
        std::thread::sleep(Duration::from_millis(60));
        p.vm_paused(false);
        assert!(p.tick(Instant::now()));
        assert_eq!(p.state(), Presence::Lost);
    }

    #[test]
    fn names_round_trip() {
        for p in [
            Presence::Unknown,
            Presence::Booting,
            Presence::Alive,
            Presence::Suspect,
            Presence::Lost,
            Presence::Gone,
        ] {
            assert_eq!(Presence::parse(p.as_str()), Some(p));
        }
    }
}
