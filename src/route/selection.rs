//! Which networks the user wants (networks.md §1.2), as NetBird's route selector decides:
//! non-exit routes are on unless deselected; an exit node only when the user selected it or,
//! with no choice of the user's, when management lets it apply itself (`!skipAutoApply`); at
//! most one exit node, the smallest NetID among the candidates; "deselect all" turns every
//! route off, exit nodes included.

use std::collections::BTreeSet;

/// The user's choice, from `--networks-select` and `--networks-deselect`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Networks named with `--networks-select` (empty: no explicit choice).
    pub selected: BTreeSet<String>,
    pub deselected: BTreeSet<String>,
    pub deselect_all: bool,
}

/// A network as the selector sees it: its NetID, whether it is an exit node, and whether
/// management lets it apply itself.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub net_id: &'a str,
    pub exit: bool,
    pub skip_auto_apply: bool,
}

impl Selection {
    /// From the flags' values; `all` selects (or deselects) everything.
    pub fn from_flags(select: &[String], deselect: &[String]) -> Self {
        let split = |v: &[String]| -> BTreeSet<String> {
            v.iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let mut selected = split(select);
        let mut deselected = split(deselect);
        let deselect_all = deselected.remove("all");
        if selected.remove("all") {
            // `select all`: every network on, exit nodes by management's say.
            deselected.clear();
        }
        Self {
            selected,
            deselected,
            deselect_all,
        }
    }

    /// Whether each candidate is on, in order.
    pub fn apply(&self, candidates: &[Candidate<'_>]) -> Vec<bool> {
        if self.deselect_all {
            return vec![false; candidates.len()];
        }
        let chosen_exit = |pred: &dyn Fn(&Candidate) -> bool| {
            candidates
                .iter()
                .filter(|c| c.exit && !self.deselected.contains(c.net_id) && pred(c))
                .map(|c| c.net_id)
                .min()
        };
        // `select A B` deselects what it does not name, exit nodes included: management's
        // choice of exit node applies only while the user chose nothing.
        let exit = chosen_exit(&|c| self.selected.contains(c.net_id)).or_else(|| {
            if self.selected.is_empty() {
                chosen_exit(&|c| !c.skip_auto_apply)
            } else {
                None
            }
        });
        let explicit = candidates
            .iter()
            .any(|c| !c.exit && self.selected.contains(c.net_id));
        candidates
            .iter()
            .map(|c| {
                if self.deselected.contains(c.net_id) {
                    false
                } else if c.exit {
                    Some(c.net_id) == exit
                } else if explicit {
                    // `select A B`: only the networks named.
                    self.selected.contains(c.net_id)
                } else {
                    true
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(net_id: &str, exit: bool, skip: bool) -> Candidate<'_> {
        Candidate {
            net_id,
            exit,
            skip_auto_apply: skip,
        }
    }

    fn sel(select: &[&str], deselect: &[&str]) -> Selection {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Selection::from_flags(&v(select), &v(deselect))
    }

    #[test]
    fn networks_are_on_by_default_and_one_exit_node_applies_itself() {
        let cands = [
            c("db", false, false),
            c("exit-b", true, false),
            c("exit-a", true, false),
            c("exit-0", true, true),
        ];
        assert_eq!(sel(&[], &[]).apply(&cands), vec![true, false, true, false]);
    }

    #[test]
    fn the_users_exit_node_wins_and_deselect_all_turns_everything_off() {
        let cands = [
            c("db", false, false),
            c("exit-a", true, false),
            c("exit-z", true, true),
        ];
        assert_eq!(sel(&["exit-z"], &[]).apply(&cands), vec![true, false, true]);
        assert_eq!(
            sel(&[], &["exit-a"]).apply(&cands),
            vec![true, false, false]
        );
        assert_eq!(sel(&[], &["all"]).apply(&cands), vec![false, false, false]);
        assert_eq!(
            sel(&["all"], &["db"]).apply(&cands),
            vec![true, true, false]
        );
    }

    #[test]
    fn selecting_networks_by_name_leaves_the_others_off() {
        let cands = [
            c("db", false, false),
            c("k8s", false, false),
            c("exit", true, false),
        ];
        assert_eq!(sel(&["k8s"], &[]).apply(&cands), vec![false, true, false]);
        assert_eq!(
            sel(&["k8s,db"], &["db"]).apply(&cands),
            vec![false, true, false]
        );
        assert_eq!(
            sel(&["k8s,exit"], &[]).apply(&cands),
            vec![false, true, true]
        );
    }
}
