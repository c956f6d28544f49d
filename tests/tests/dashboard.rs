//! The dashboard in a real browser (headless Chromium, driven over the
//! DevTools protocol): signed in by `evalflow dashboard`'s address, it
//! shows the progress of a real `serve`, updates by itself as runs end,
//! groups failures by cause with their evidence, draws the cost per
//! profile, shows the leaderboard, and opens a run's page with its history
//! and the end of its output, which stays text whatever a submission wrote.

use std::time::Duration;

use evalflow_tests::browser::Browser;
use evalflow_tests::local::{competition, serve, submit};

#[test]
fn the_dashboard_follows_the_runs_and_opens_one() {
    let dir = tempfile::tempdir().unwrap();
    let cli = competition(&dir.path().join("competition"));
    let _engine = serve(&cli);
    let subs = dir.path().join("subs");
    let hostile = r#"print("<script>document.title='owned'</script><img src=x onerror=\"document.title='owned'\">")"#;
    submit(&cli, &subs, "quick", &format!("{hostile}\nhalves()\n"));
    submit(&cli, &subs, "broken", "sys.exit(3)\n");
    submit(&cli, &subs, "slow", "time.sleep(8)\nhalves()\n");
    let address = cli.ok(&["dashboard"]).trim().to_owned();
    assert!(address.contains("/dashboard?token="), "{address}");

    let mut page = Browser::open(&address);
    let ended = "document.getElementById('ended')?.textContent";
    let first = page.wait_for("the page shows the runs", Duration::from_secs(30), ended);
    assert!(first.as_str().unwrap().ends_with(" / 3") && first != "3 / 3", "slow runs for 8 s still: {first}");
    assert_eq!(page.eval("location.href.includes('token=')"), false, "the token leaves the address");
    // The same page, updated by itself as the runs end.
    page.wait_for("every run ended", Duration::from_secs(60), &format!("{ended} === '3 / 3'"));
    assert_eq!(page.eval("document.getElementById('eta').textContent"), "done");
    let crashed = page.wait_for(
        "failures by cause",
        Duration::from_secs(10),
        "document.querySelector('[data-cause=\"crashed\"]')?.textContent",
    );
    let crashed = crashed.as_str().unwrap();
    assert!(crashed.contains("broken-public") && crashed.contains("exited with code 3"), "{crashed}");
    assert_eq!(page.eval("document.querySelectorAll('#cost-chart rect[data-profile=\"g4\"]').length"), 1);
    let board = page.eval("document.querySelector('[data-stage=\"public\"]').textContent");
    assert!(board.as_str().unwrap().contains("quick-public") && board.as_str().unwrap().contains("slow-public"));

    page.eval("document.querySelector('#leaderboards a[data-run=\"quick-public\"]').click()");
    page.wait_for(
        "the run's page",
        Duration::from_secs(10),
        "document.getElementById('run-id')?.textContent === 'quick-public'",
    );
    let history =
        page.wait_for("its history", Duration::from_secs(10), "document.getElementById('history')?.textContent");
    assert!(history.as_str().unwrap().contains("published") && history.as_str().unwrap().contains("job_ended"));
    let stdout = page.wait_for(
        "its output",
        Duration::from_secs(10),
        "document.querySelector('pre[data-part=\"stdout\"]')?.textContent",
    );
    assert!(stdout.as_str().unwrap().contains("<script>document.title='owned'</script><img src=x"), "{stdout}");
    assert_eq!(
        page.eval("document.querySelectorAll('#log script, #log img, main script').length"),
        0,
        "text, not markup"
    );
    assert_ne!(page.eval("document.title"), "owned");

    // Without the token, nothing: not the page, not the API.
    let base = address.split("/dashboard").next().unwrap().to_owned();
    let mut stranger = Browser::open(&format!("{base}/dashboard"));
    let said = stranger.wait_for("the refusal", Duration::from_secs(10), "document.body?.textContent");
    assert!(said.as_str().unwrap().contains("missing or wrong API token"), "{said}");
    let wrong = Browser::open(&format!("{base}/dashboard?token=0000")).wait_for(
        "the refusal",
        Duration::from_secs(10),
        "document.body?.textContent",
    );
    assert!(wrong.as_str().unwrap().contains("missing or wrong API token"), "{wrong}");
}
