//! The web dashboard in a real browser, the way a user meets it: a real `tuchka serve --listen`
//! with a group of two TCG VMs, and Debian's headless `chromium` under `chromedriver`.
//!
//! Opens the login link `tuchka ui` prints, sees the host and the VMs with their states, stops
//! a VM from the page (through the confirmation dialog) and watches it turn `stopped` live (no
//! reload), starts it again, follows its console log, cancels a dialog with Escape (focus goes
//! back), and sees a refused action's ApiError on the page. Saves screenshots under
//! `target/dashboard-screenshots/` and prints the first load's bytes and time to first render.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use browser::Browser;
use common::Cloud;
use serde_json::{json, Value};

fn cidr() -> String {
    let p = std::process::id();
    format!("10.{}.{}.0/24", 150 + p % 50, (p / 50 + 11) % 256)
}

fn shots() -> PathBuf {
    common::root().join("target/dashboard-screenshots")
}

/// What the first load cost: bytes over the wire (document, assets, API answers) and the
/// time from navigation start to the page's first complete render.
fn load_figures(b: &Browser) -> Value {
    b.js(
        "const nav = performance.getEntriesByType('navigation')[0];
         const res = performance.getEntriesByType('resource');
         const mark = performance.getEntriesByName('tuchka-first-render')[0];
         const assets = res.filter(r => r.name.includes('/ui/'));
         const apis = res.filter(r => r.name.includes('/v1/') && !r.name.includes('/v1/events'));
         const sum = (l, k) => l.reduce((n, r) => n + (r[k] || 0), 0);
         return {
           transfer_bytes: nav.transferSize + sum(res, 'transferSize'),
           document_bytes: nav.transferSize, asset_bytes: sum(assets, 'transferSize'),
           api_bytes: sum(apis, 'transferSize'), api_body_bytes: sum(apis, 'decodedBodySize'),
           requests: 1 + res.length,
           first_render_ms: mark ? Math.round(mark.startTime) : null,
           dom_content_loaded_ms: Math.round(nav.domContentLoadedEventEnd),
         };",
        json!([]),
    )
}

#[test]
fn the_dashboard_in_a_real_browser() {
    browser::require_browser();
    let image = common::test_image();
    let mut c = Cloud::start("dash");
    let port = common::free_port();
    c.stop_serve();
    c.spawn_serve(&["--accel", "tcg", "--listen", &format!("127.0.0.1:{port}")]);

    c.ok(&[
        "image",
        "upload",
        image.to_str().expect("path"),
        "--name",
        "tiny",
    ]);
    c.ok(&["net", "create", "lan", "--cidr", &cidr(), "--wait"]);
    c.track_network("lan");
    c.ok(&[
        "group", "create", "web", "--image", "tiny", "--count", "2", "--cpus", "1", "--memory",
        "160M", "--disk", "1G", "--net", "lan", "--wait",
    ]);
    for vm in ["web-0", "web-1"] {
        assert_eq!(c.vm(vm)["state"], "running");
    }

    // The login link, as `tuchka ui` prints it.
    let login = c.ok(&["ui", "-o", "json"]).json();
    let link = login["link"].as_str().expect("ui link").to_string();
    assert!(
        link.starts_with(&format!("https://127.0.0.1:{port}/ui/#token=")),
        "{link}"
    );
    let base = link.split('#').next().expect("url").to_string();

    let _ = std::fs::remove_dir_all(shots());
    let b = Browser::start(&c.dir.join("tls/server.crt"), 1280, 900);
    let started = Instant::now();
    b.goto(&link);

    // Overview: the host's card with its bars and chart, the VMs counted by state.
    let card = format!("article[data-host=\"{}\"][data-state=\"up\"]", c.host);
    b.wait_for(&card, Duration::from_secs(20), "the host's card");
    b.wait_for(
        "b[data-count=\"running\"]",
        Duration::from_secs(10),
        "VMs by state",
    );
    let first = load_figures(&b);
    eprintln!(
        "dashboard first load (cold cache, 1 host, 2 VMs): {first} ({} ms to the host card seen by the test)",
        started.elapsed().as_millis()
    );
    assert_eq!(b.text("b[data-count=\"running\"]"), "2");
    assert!(
        b.find(&format!("{card} svg.chart")).is_some() && b.find(&format!("{card} .bar")).is_some(),
        "the host card has its bars and load chart"
    );
    let url = b.js("return location.href", json!([]));
    assert!(
        !url.as_str().unwrap_or_default().contains("token="),
        "the token is taken out of the address bar: {url}"
    );
    b.wait_for(
        "#live[data-live=\"on\"]",
        Duration::from_secs(10),
        "the event stream",
    );

    // Reload: the assets are revalidated by their ETags (no body), the token kept by the tab.
    b.js("location.reload()", json!([]));
    b.wait_for(
        &card,
        Duration::from_secs(20),
        "the host card after a reload",
    );
    eprintln!(
        "dashboard reload (warm, ETag revalidation): {}",
        load_figures(&b)
    );

    // The VMs page: both running. A marker on `window` shows later changes come without a
    // page load.
    b.click("a[data-nav=\"vms\"]");
    b.wait_for(
        "tr[data-vm=\"web-0\"][data-state=\"running\"]",
        Duration::from_secs(10),
        "web-0 running",
    );
    b.wait_for(
        "tr[data-vm=\"web-1\"][data-state=\"running\"]",
        Duration::from_secs(10),
        "web-1 running",
    );
    b.js("window.tuchkaTestMarker = 42", json!([]));
    b.screenshot(&shots().join("vms.png"));

    // Escape cancels a dialog and gives the focus back to its button; nothing is stopped.
    b.click("#act-stop-web-1");
    b.wait_for("dialog[open]", Duration::from_secs(5), "the stop dialog");
    assert_eq!(
        b.js("return document.activeElement.id", json!([])),
        "dialog-cancel",
        "a destructive dialog starts on Cancel"
    );
    b.keys("\u{e00c}");
    b.wait_for(
        "dialog:not([open])",
        Duration::from_secs(5),
        "Escape to close the dialog",
    );
    let focused = b.js("return document.activeElement.id", json!([]));
    assert_eq!(
        focused, "act-stop-web-1",
        "focus is back on the button that opened it"
    );
    assert_eq!(c.vm("web-1")["desired"], "running");

    // Stop web-0 from the page: confirm the dialog, then watch the row turn stopped.
    b.click("#act-stop-web-0");
    b.wait_for("dialog[open]", Duration::from_secs(5), "the stop dialog");
    assert!(
        b.text("#dialog-title").contains("web-0"),
        "{}",
        b.text("#dialog-title")
    );
    b.screenshot(&shots().join("confirm-stop.png"));
    b.click("#dialog-ok");
    b.wait_for(
        "#flash-msg[data-kind=\"ok\"]",
        Duration::from_secs(10),
        "the stop accepted",
    );
    b.wait_for(
        "tr[data-vm=\"web-0\"][data-state=\"stopped\"]",
        Duration::from_secs(120),
        "web-0 to show stopped live",
    );
    assert_eq!(c.vm("web-0")["state"], "stopped");
    assert_eq!(
        b.js("return window.tuchkaTestMarker", json!([])),
        42,
        "the state changed without a page load"
    );
    b.click("#act-start-web-0");
    b.wait_for(
        "tr[data-vm=\"web-0\"][data-state=\"running\"]",
        Duration::from_secs(120),
        "web-0 to show running again",
    );
    assert_eq!(b.js("return window.tuchkaTestMarker", json!([])), 42);

    // The console log of web-0, followed: the test image's boot markers appear.
    b.click("tr[data-vm=\"web-0\"] a[href=\"#/vms/web-0\"]");
    b.wait_for(
        "h1[data-vm=\"web-0\"]",
        Duration::from_secs(10),
        "web-0's page",
    );
    b.screenshot(&shots().join("vm.png"));
    b.click("#console-link");
    b.wait_for(
        "pre#console[data-vm=\"web-0\"]",
        Duration::from_secs(10),
        "the console",
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !b.text("#console").contains("TESTIMG-") {
        assert!(
            Instant::now() < deadline,
            "no boot text in the console view:\n{}",
            b.text("#console")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let before = b.js(
        "return Number(document.querySelector('#console').dataset.end)",
        json!([]),
    );
    b.screenshot(&shots().join("console.png"));
    eprintln!("console view: {} bytes followed so far", before);

    // A refused action: migrating on a one-host cloud. The page shows the API's error.
    b.goto(&format!("{base}#/vms"));
    b.wait_for(
        "tr[data-vm=\"web-1\"][data-state=\"running\"]",
        Duration::from_secs(10),
        "the VMs",
    );
    b.click("#act-migrate-web-1");
    b.wait_for(
        "dialog[open] #migrate-to",
        Duration::from_secs(10),
        "the migrate dialog",
    );
    b.click("#dialog-ok");
    b.wait_for(
        "#flash-msg[data-kind=\"error\"]",
        Duration::from_secs(10),
        "the refusal",
    );
    let shown = b.text("#flash-msg .error-message");
    let code = b.js(
        "return document.querySelector('#flash-msg .error-block').dataset.error",
        json!([]),
    );
    let cli = c.fails(&["vm", "migrate", "web-1"]);
    eprintln!(
        "refused on the page: {code} {shown:?}; the CLI says: {}",
        cli.trim()
    );
    assert!(
        !shown.is_empty() && code.as_str().is_some_and(|s| !s.is_empty()),
        "{shown} {code}"
    );
    assert!(
        cli.contains(shown.trim()),
        "the page shows the API's message as given: {shown:?} vs the CLI's {cli:?}"
    );
    let focused = b.js("return document.activeElement.id", json!([]));
    assert_eq!(focused, "act-migrate-web-1", "focus is back on its button");
    b.screenshot(&shots().join("refused.png"));
    assert_eq!(
        c.vm("web-1")["host"],
        c.host.as_str(),
        "a refused request changes nothing"
    );

    // The other pages render with their data.
    for (nav, sel) in [
        ("hosts", format!("tr[data-host=\"{}\"]", c.host)),
        (
            "groups",
            "tr[data-group=\"web\"][data-count=\"2\"]".to_string(),
        ),
        (
            "networks",
            "tr[data-network=\"lan\"][data-state=\"ready\"]".to_string(),
        ),
        ("images", "tr[data-image=\"tiny\"]".to_string()),
        (
            "operations",
            "tr[data-kind=\"vm.stop\"][data-state=\"succeeded\"]".to_string(),
        ),
        ("balance", "#act-plan".to_string()),
    ] {
        b.click(&format!("a[data-nav=\"{nav}\"]"));
        b.wait_for(&sel, Duration::from_secs(10), nav);
        b.screenshot(&shots().join(format!("{nav}.png")));
    }
    b.click("a[data-nav=\"networks\"]");
    b.click("tr[data-network=\"lan\"] a");
    b.wait_for(
        "h1[data-network=\"lan\"]",
        Duration::from_secs(10),
        "the network's page",
    );
    assert!(
        b.text("main").contains("web-0"),
        "its addresses list the VMs"
    );

    // The overview's load chart: by now the controller has sampled the host a few times
    // (every 20 s; GET /v1/history).
    b.click("#flash-close");
    b.click("a[data-nav=\"overview\"]");
    b.wait_for(
        &format!("{card} svg.chart polyline.cpu"),
        Duration::from_secs(45),
        "the host's load chart to show samples",
    );
    b.screenshot(&shots().join("overview.png"));

    // Phone width: the overview still shows the host card, without a horizontal scroll bar.
    b.window(390, 844);
    b.wait_for(
        &card,
        Duration::from_secs(10),
        "the overview at phone width",
    );
    let overflow = b.js(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
        json!([]),
    );
    assert!(
        overflow.as_i64().unwrap_or(99) <= 0,
        "no sideways scrolling at 390 px: {overflow}"
    );
    b.screenshot(&shots().join("overview-phone.png"));
    drop(b);
    eprintln!("screenshots in {}", shots().display());
}
