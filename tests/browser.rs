//! A real browser (headless Chromium driven through chromedriver) uses the `shop` example through
//! nginx, in front of three processes that share one session file: it signs in, fills a cart and
//! finds it on pages served by different processes.
//!
//! Needs nginx, chromium and chromedriver (`tests/run.sh` installs them; Debian: `apt-get install
//! nginx chromium chromium-driver`; `$NGINX`, `$CHROMIUM` and `$CHROMEDRIVER` name other copies),
//! and the example binaries, which plain `cargo test` builds first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bounded, free_port, required_program, Cluster, Proc};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Starts chromedriver on a free port and waits until it says it is ready.
async fn start_chromedriver(cluster: &Cluster) -> (Proc, u16) {
    let chromedriver = required_program("CHROMEDRIVER", CHROMEDRIVER, "chromium-driver");
    let port = free_port();
    let mut command = Command::new(chromedriver);
    command.arg(format!("--port={port}"));
    let mut process = Proc::spawn_group(
        "chromedriver",
        command,
        cluster.dir().join("chromedriver.log"),
    );
    let url = format!("http://127.0.0.1:{port}/status");
    let deadline = Instant::now() + common::STARTUP;
    loop {
        if let Ok(response) = cluster.client.get(&url).send().await {
            if let Ok(status) = response.json::<serde_json::Value>().await {
                if status["value"]["ready"] == json!(true) {
                    return (process, port);
                }
            }
        }
        if let Some(status) = process.exited() {
            panic!("chromedriver exited ({status})\n{}", process.log_tail());
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver was not ready within {:?}",
            common::STARTUP
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_browser(cluster: &Cluster, driver_port: u16) -> Client {
    let chromium = required_program("CHROMIUM", CHROMIUM, "chromium");
    let profile = cluster.dir().join("chromium-profile");
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        unreachable!("a JSON object literal");
    };
    ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .expect("start a Chromium session through chromedriver")
}

/// Clicks `target` and waits until the page it leads to has fully replaced the current one: a
/// mark set on the current window is gone (a navigation starts a fresh window object) and the new
/// document has loaded. What is read next then comes from the new page.
async fn click_and_wait(browser: &Client, target: Locator<'_>) {
    browser
        .execute("window.__previousPage = true;", vec![])
        .await
        .expect("mark the current page");
    browser
        .find(target)
        .await
        .unwrap_or_else(|error| panic!("nothing to click at {target:?}: {error}"))
        .click()
        .await
        .expect("click");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let replaced = browser
            .execute(
                "return window.__previousPage === undefined && document.readyState === 'complete';",
                vec![],
            )
            .await;
        // An error here means the page was being swapped out while asked: look again.
        if matches!(replaced, Ok(serde_json::Value::Bool(true))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "clicking {target:?} did not lead to a new page"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Text of the element with id `id`.
async fn text_of(browser: &Client, id: &str) -> String {
    browser
        .find(Locator::Id(id))
        .await
        .unwrap_or_else(|error| panic!("no #{id} on the page: {error}"))
        .text()
        .await
        .expect("element text")
}

/// The pid in the page's footer.
async fn served_by(browser: &Client) -> u32 {
    text_of(browser, "pid")
        .await
        .parse()
        .expect("#pid holds a process id")
}

/// The cart as the cart page shows it: item id -> quantity.
async fn cart_on_page(browser: &Client) -> BTreeMap<String, u32> {
    let mut cart = BTreeMap::new();
    for line in browser
        .find_all(Locator::Css("#cart li"))
        .await
        .expect("cart lines")
    {
        let item = line
            .attr("data-item")
            .await
            .expect("data-item")
            .expect("each cart line names its item");
        let quantity = line
            .find(Locator::Css(".quantity"))
            .await
            .expect("a quantity")
            .text()
            .await
            .expect("quantity text")
            .parse()
            .expect("a number");
        cart.insert(item, quantity);
    }
    cart
}

async fn sign_in(browser: &Client, name: &str) {
    let field = browser
        .find(Locator::Id("username"))
        .await
        .expect("the sign-in form");
    field.send_keys(name).await.expect("type the name");
    click_and_wait(browser, Locator::Id("login")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_keeps_its_cart_while_processes_take_turns() {
    bounded(Duration::from_secs(180), async {
        let cluster = Cluster::start("shop", 3, &[]).await;
        let (_driver, driver_port) = start_chromedriver(&cluster).await;
        let browser = start_browser(&cluster, driver_port).await;
        let home = cluster.url("/");
        let mut pids = BTreeSet::new();

        browser.goto(&home).await.expect("open the shop");
        assert!(
            browser.find(Locator::Id("user-none")).await.is_ok(),
            "a first visit is not signed in"
        );
        assert!(
            browser.get_all_cookies().await.unwrap().is_empty(),
            "the sign-in page set a cookie before anything was stored"
        );
        pids.insert(served_by(&browser).await);

        sign_in(&browser, "alice").await;
        assert_eq!(text_of(&browser, "user").await, "alice");
        pids.insert(served_by(&browser).await);
        let cookie = browser
            .get_named_cookie("session")
            .await
            .expect("the session cookie");
        assert_eq!(cookie.http_only(), Some(true), "the cookie is not HttpOnly");

        let mut expected = BTreeMap::new();
        for item in ["teapot", "mug", "teapot", "tea", "kettle", "teapot"] {
            click_and_wait(&browser, Locator::Id(&format!("add-{item}"))).await;
            *expected.entry(item.to_owned()).or_insert(0u32) += 1;
            let count: u32 = text_of(&browser, "cart-count").await.parse().unwrap();
            assert_eq!(count, expected.values().sum::<u32>(), "after adding {item}");
            pids.insert(served_by(&browser).await);
        }

        // The cart page, loaded again and again: whichever process serves it shows the same cart.
        for _ in 0..6 {
            browser
                .goto(&cluster.url("/cart"))
                .await
                .expect("open the cart");
            assert_eq!(cart_on_page(&browser).await, expected);
            assert_eq!(text_of(&browser, "user").await, "alice");
            pids.insert(served_by(&browser).await);
        }

        let running: BTreeSet<u32> = cluster.pids().into_iter().collect();
        assert!(
            pids.is_subset(&running),
            "pages claim pids {pids:?}, but the shop runs as {running:?}"
        );
        assert!(
            pids.len() >= 2,
            "every page came from one process ({pids:?}): the session was never shown to follow"
        );

        // Sign out: the session is gone, on every process.
        click_and_wait(&browser, Locator::Id("logout")).await;
        assert!(
            browser.find(Locator::Id("username")).await.is_ok(),
            "no sign-in form after signing out"
        );
        assert!(
            browser.get_named_cookie("session").await.is_err(),
            "the session cookie outlived the sign-out"
        );
        for _ in 0..3 {
            browser
                .goto(&cluster.url("/cart"))
                .await
                .expect("open the cart");
            assert!(
                browser.find(Locator::Id("username")).await.is_ok(),
                "the cart page did not send a signed-out visitor to sign in"
            );
        }

        // Someone else signs in on the same browser: an empty cart, and the name shown as text.
        let name = "<b>bob</b> & co";
        sign_in(&browser, name).await;
        assert_eq!(text_of(&browser, "user").await, name);
        assert_eq!(text_of(&browser, "cart-count").await, "0");

        browser.close().await.expect("close the browser");
        eprintln!("pages served by {} processes: {pids:?}", pids.len());
    })
    .await;
}
