//! `evalflow backup DEST` while `serve` runs: DEST is a data directory a
//! new `serve` starts from, with every run as it was at one moment (its
//! histories replay), the same leaderboard, and the same stages; a damaged
//! store is named with what to do.

use std::fs;
use std::time::Duration;

use evalflow_activities::leaderboard::Leaderboard;
use evalflow_tests::cli::{Cli, wait_until};
use evalflow_tests::local::{competition, runs, serve, submit, wait_ended};
use evalflow_workflow::StateTag;

fn states(cli: &Cli) -> Vec<(String, StateTag, Option<f64>)> {
    runs(cli).into_iter().map(|r| (r.id.to_string(), r.state, r.score)).collect()
}

#[test]
fn a_backup_taken_while_serving_starts_a_competition_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    let engine = serve(&cli);
    let subs = dir.path().join("subs");
    submit(&cli, &subs, "first", "halves()\n");
    submit(&cli, &subs, "second", "halves()\n");
    wait_ended(&cli, &["first", "second"], Duration::from_secs(60));
    // The engine is busy with a third run while the backup is written.
    submit(&cli, &subs, "third", "time.sleep(1)\nhalves()\n");
    let dest = dir.path().join("backup");
    let said = cli.ok(&["backup", dest.to_str().unwrap()]);
    assert!(said.contains("backup of 3 runs written to") && said.contains("serve --data-dir"), "{said}");
    let again = cli.fails(&["backup", dest.to_str().unwrap()]);
    assert!(again.contains("exists already: name a new directory (a backup never overwrites)"), "{again}");
    for inside in ["state/copy", "jobs/copy", "jobs/../results/copy"] {
        let said = cli.fails(&["backup", cli.data_dir.join(inside).to_str().unwrap()]);
        assert!(said.contains("is inside the data directory, where jobs write"), "{inside}: {said}");
    }
    wait_ended(&cli, &["third"], Duration::from_secs(60));
    let board: Leaderboard = cli.json(&["leaderboard", "--json"]);
    drop(engine);

    let copy = Cli::new(&dest);
    assert!(!dest.join("state/api.token").exists(), "the running engine's token is not copied");
    let restored = states(&copy);
    assert_eq!(restored.len(), 3);
    assert_eq!(restored[..2], states(&cli)[..2], "the ended runs, as they were");
    assert!(copy.ok(&["replay", "--all"]).contains("3 runs replayed, 0 diverge"), "copied at one moment");

    // A competition of its own: it finishes the third run and takes new ones.
    let _copy_engine = serve(&copy);
    submit(&copy, &subs, "fourth", "halves()\n");
    wait_until("the copy publishes every run", Duration::from_secs(60), || {
        runs(&copy).iter().all(|r| r.state == StateTag::Published) && runs(&copy).len() == 4
    });
    let copied: Leaderboard = copy.json(&["leaderboard", "--json"]);
    assert_eq!(copied.entries.len(), board.entries.len() + 1, "{copied:?}");
}

#[test]
fn a_damaged_store_says_which_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    submit(&cli, &dir.path().join("subs"), "first", "halves()\n");
    let store = cli.data_dir.join("state/store");
    for entry in fs::read_dir(&store).unwrap().flatten().filter(|e| e.file_type().unwrap().is_file()) {
        let mut bytes = fs::read(entry.path()).unwrap();
        bytes.iter_mut().take(4096).for_each(|b| *b ^= 0x5a);
        fs::write(entry.path(), bytes).unwrap();
    }
    let said = cli.fails(&["status"]);
    assert!(
        said.contains(&format!("the store in {} cannot be opened: its files are damaged", store.display())),
        "{said}"
    );
    assert!(said.contains("restore it from a backup (`evalflow backup DEST` makes one"), "{said}");
    assert!(said.contains("fails its checksum") && !said.contains("Some(Inline("), "in words, not sled's: {said}");
}
