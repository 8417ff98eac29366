//! Run: `cargo run --release --example shop -- --listen 127.0.0.1:3000 --store /tmp/sessions --insecure-cookies`
//!
//! A small shop: sign in with a name, put things in a cart, look at the cart, sign out. Every page
//! says which process served it, so with several copies behind a load balancer (`examples/demo.sh`
//! starts three behind nginx) you can watch the session follow you from process to process.
//!
//! Forms POST and then redirect (303) to a page, so reloading a page never repeats an action.
//! Signing in gives the session a new id (`cycle_id`), against session fixation. Elements the browser
//! test looks at have stable ids: `pid`, `user`, `cart`, `cart-count`, `username`, `login`,
//! `add-<item>`, `logout`.
//!
//! Flags as for the counter example: `--listen`, `--store`, `--insecure-cookies` (cookies without
//! `Secure`, for plain http), `--reuse-port` (several processes on one port; each response then
//! closes its connection, so that the kernel can hand the next page to another process).
//!
//! `GET /metrics` answers the process's metrics in the Prometheus text format: the session
//! layer's and the store's (README, "Metrics"). Each process answers its own; a real deployment
//! would serve them on an address of their own, not through the public proxy.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use clap::Parser;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use mmap_session::{SessionError, TypedSession};
use serde::{Deserialize, Serialize};

#[path = "common/mod.rs"]
mod common;

#[derive(Parser, Debug)]
#[command(
    about = "A small shop whose sessions are shared by every process that opens the same file"
)]
struct Cli {
    #[command(flatten)]
    server: common::ServerArgs,
}

/// Everything the shop keeps in a session.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Visitor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    /// Item id -> quantity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    cart: BTreeMap<String, u32>,
}

impl Visitor {
    fn items_in_cart(&self) -> u32 {
        self.cart.values().sum()
    }
}

struct Item {
    id: &'static str,
    name: &'static str,
    cents: u32,
}

const CATALOGUE: &[Item] = &[
    Item {
        id: "teapot",
        name: "Teapot (short and stout)",
        cents: 2400,
    },
    Item {
        id: "mug",
        name: "Enamel mug",
        cents: 900,
    },
    Item {
        id: "kettle",
        name: "Stovetop kettle",
        cents: 3500,
    },
    Item {
        id: "tea",
        name: "Assam tea, 250 g",
        cents: 750,
    },
];

fn item(id: &str) -> Option<&'static Item> {
    CATALOGUE.iter().find(|item| item.id == id)
}

/// Longest user name accepted, in characters.
const MAX_NAME: usize = 40;

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn price(cents: u32) -> String {
    format!("€{}.{:02}", cents / 100, cents % 100)
}

/// The frame of every page: navigation, who is signed in, and which process served the page.
fn page(title: &str, visitor: &Visitor, body: &str) -> Html<String> {
    let mut nav = String::new();
    if let Some(user) = &visitor.user {
        let _ = write!(
            nav,
            r#"<a href="/" id="nav-catalogue">Catalogue</a> ·
<a href="/cart" id="nav-cart">Cart (<span id="cart-count">{count}</span>)</a> ·
signed in as <strong id="user">{user}</strong>
<form method="post" action="/logout" class="inline"><button id="logout" type="submit">Sign out</button></form>"#,
            count = visitor.items_in_cart(),
            user = escape(user),
        );
    } else {
        nav.push_str(r#"<span id="user-none">not signed in</span>"#);
    }
    Html(format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} · mmap-session shop</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; }}
nav {{ border-bottom: 1px solid #ccc; padding-bottom: .5rem; }}
form.inline {{ display: inline; }}
footer {{ margin-top: 2rem; color: #666; border-top: 1px solid #ccc; padding-top: .5rem; }}
#pid {{ font-weight: bold; color: #a30; }}
</style>
</head>
<body>
<nav>{nav}</nav>
<h1 id="title">{title}</h1>
{body}
<footer>This page was served by process <span id="pid">{pid}</span>.</footer>
</body>
</html>
"#,
        title = escape(title),
        pid = std::process::id(),
    ))
}

fn login_page(visitor: &Visitor, problem: Option<&str>) -> Html<String> {
    let problem = problem
        .map(|text| format!(r#"<p id="problem">{}</p>"#, escape(text)))
        .unwrap_or_default();
    let body = format!(
        r#"{problem}<form method="post" action="/login" id="login-form">
<label>Your name <input id="username" name="username" maxlength="{MAX_NAME}" autofocus required></label>
<button id="login" type="submit">Sign in</button>
</form>"#
    );
    page("Sign in", visitor, &body)
}

/// The catalogue when signed in, the sign-in form otherwise.
async fn home(session: TypedSession<Visitor>) -> Result<Html<String>, SessionError> {
    let visitor = session.get().await?;
    if visitor.user.is_none() {
        return Ok(login_page(&visitor, None));
    }
    let mut body = String::from(r#"<ul id="catalogue">"#);
    for item in CATALOGUE {
        let _ = write!(
            body,
            r#"<li id="item-{id}">{name}, {price}
<form method="post" action="/cart/add" class="inline"><input type="hidden" name="item" value="{id}"><button id="add-{id}" type="submit">Add to cart</button></form></li>"#,
            id = item.id,
            name = escape(item.name),
            price = price(item.cents),
        );
    }
    body.push_str("</ul>");
    Ok(page("Catalogue", &visitor, &body))
}

#[derive(Deserialize)]
struct Login {
    username: String,
}

async fn login(
    session: TypedSession<Visitor>,
    Form(form): Form<Login>,
) -> Result<Response, SessionError> {
    let name = form.username.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        let visitor = session.get().await?;
        let problem = format!("Please give a name of 1 to {MAX_NAME} characters.");
        return Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            login_page(&visitor, Some(&problem)),
        )
            .into_response());
    }
    session.update(|v| v.user = Some(name.to_owned())).await?;
    // A new id for the signed-in session: an id planted before sign-in is worth nothing after it.
    session.session().cycle_id().await?;
    tracing::info!(pid = std::process::id(), "signed in");
    Ok(Redirect::to("/").into_response())
}

#[derive(Deserialize)]
struct CartChange {
    item: String,
}

async fn add_to_cart(
    session: TypedSession<Visitor>,
    Form(form): Form<CartChange>,
) -> Result<Redirect, SessionError> {
    if item(&form.item).is_some() {
        session
            .update(|v| {
                if v.user.is_some() {
                    *v.cart.entry(form.item).or_insert(0) += 1;
                }
            })
            .await?;
    }
    Ok(Redirect::to("/"))
}

async fn remove_from_cart(
    session: TypedSession<Visitor>,
    Form(form): Form<CartChange>,
) -> Result<Redirect, SessionError> {
    session
        .update(|v| {
            if let Some(quantity) = v.cart.get_mut(&form.item) {
                *quantity = quantity.saturating_sub(1);
                if *quantity == 0 {
                    v.cart.remove(&form.item);
                }
            }
        })
        .await?;
    Ok(Redirect::to("/cart"))
}

async fn cart(session: TypedSession<Visitor>) -> Result<Response, SessionError> {
    let visitor = session.get().await?;
    if visitor.user.is_none() {
        return Ok(Redirect::to("/").into_response());
    }
    let mut body = String::new();
    if visitor.cart.is_empty() {
        body.push_str(r#"<p id="cart-empty">Your cart is empty.</p><ul id="cart"></ul>"#);
    } else {
        body.push_str(r#"<ul id="cart">"#);
        let mut total = 0u32;
        for (id, quantity) in &visitor.cart {
            let Some(item) = item(id) else { continue };
            total = total.saturating_add(item.cents.saturating_mul(*quantity));
            let _ = write!(
                body,
                r#"<li data-item="{id}"><span class="quantity">{quantity}</span> × {name}
<form method="post" action="/cart/remove" class="inline"><input type="hidden" name="item" value="{id}"><button id="remove-{id}" type="submit">Remove one</button></form></li>"#,
                id = item.id,
                name = escape(item.name),
            );
        }
        let _ = write!(
            body,
            r#"</ul><p>Total: <span id="total">{}</span></p>"#,
            price(total)
        );
    }
    Ok(page("Cart", &visitor, &body).into_response())
}

async fn logout(session: TypedSession<Visitor>) -> Result<Redirect, SessionError> {
    session.session().flush().await?;
    Ok(Redirect::to("/"))
}

async fn health() -> &'static str {
    "ok"
}

/// With SO_REUSEPORT the kernel picks a process per connection, and a browser keeps its connection
/// open from page to page: closing it after each response lets the next page land anywhere.
async fn close_connection(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// Histogram buckets: lease waits in seconds, encoded sessions in bytes.
const LEASE_WAIT_BUCKETS: &[f64] = &[
    0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];
const SIZE_BUCKETS: &[f64] = &[64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0];

/// Installs the Prometheus recorder (before the layer serves its first request, so that the
/// layer's metrics reach it) and a task that keeps its histograms bounded between scrapes.
fn install_metrics() -> Result<PrometheusHandle, Box<dyn std::error::Error>> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("mmap_session_lease_wait_seconds".into()),
            LEASE_WAIT_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("mmap_session_encoded_size_bytes".into()),
            SIZE_BUCKETS,
        )?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn app() -> Router {
    Router::new()
        .route("/", get(home))
        .route("/login", post(login))
        .route("/cart", get(cart))
        .route("/cart/add", post(add_to_cart))
        .route("/cart/remove", post(remove_from_cart))
        .route("/logout", post(logout))
        .route("/health", get(health))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    common::init_tracing();
    let cli = Cli::parse();
    let result = async {
        let metrics = install_metrics()?;
        let layer = common::session_layer(&cli.server).await?;
        let listener = common::bind(&cli.server)?;
        // Outside the session layer: a scrape touches no session.
        let mut app = app().layer(layer).route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        );
        if cli.server.reuse_port {
            app = app.layer(axum::middleware::map_response(close_connection));
        }
        common::serve(listener, app).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
