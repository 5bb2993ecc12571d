//! The live dashboard at `GET /`, in a real headless Chromium driven by chromedriver over the W3C
//! WebDriver HTTP API (Debian packages `chromium` and `chromium-driver`, installed by
//! scripts/test): the page shows the demo user's live list, a click on an item posts a click
//! event, and the list the server pushes next no longer holds the clicked item.

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use awc::http::Method;
use futures_util::FutureExt as _;
use serde_json::{json, Value};

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The key of a web element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const USER: &str = "demo-user";

#[actix_rt::test]
async fn dashboard_page_and_assets_are_served_with_their_types() {
    let server = start(test_config()).await;
    for (path, content_type, marker) in [
        ("/", "text/html; charset=utf-8", "id=\"recs\""),
        ("/dashboard/app.js", "text/javascript; charset=utf-8", "EventSource"),
        ("/dashboard/style.css", "text/css; charset=utf-8", ".recs"),
    ] {
        let mut response = client().get(format!("{}{path}", server.url())).send().await.expect("GET");
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(header("content-type").as_deref(), Some(content_type), "{path}");
        assert_eq!(header("cache-control").as_deref(), Some("no-cache"), "{path}");
        let etag = header("etag").unwrap_or_else(|| panic!("{path} has an ETag"));
        let body = response.body().await.expect("body");
        assert!(String::from_utf8_lossy(&body).contains(marker), "{path} holds {marker}");

        let again = client()
            .get(format!("{}{path}", server.url()))
            .insert_header(("if-none-match", etag))
            .send()
            .await
            .expect("GET");
        assert_eq!(again.status().as_u16(), 304, "{path} revalidates");
    }
    // The key field claims nothing about auth: hidden until the server asks for a credential.
    let page = client().get(server.url()).send().await.expect("GET").body().await.expect("body");
    let page = String::from_utf8_lossy(&page);
    assert!(!page.contains("(auth on)"), "the page does not say auth is on while it is off");
    assert!(page.contains("id=\"credential\" hidden"), "the key field starts hidden");
    // The root route does not swallow unknown paths: they still get the JSON 404.
    let missing = get(&server, "/dashboard/missing.js").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "not_found");
    server.stop().await;
}

#[actix_rt::test]
async fn dashboard_in_chromium_shows_the_live_list_and_a_click_changes_it() {
    let server = start(test_config()).await;
    let driver = ChromeDriver::spawn();
    driver.wait_ready().await;
    let browser = Browser::open(&driver).await;
    // Run the scenario, then close the browser and stop the server whatever happened; the
    // driver's guard kills chromedriver and the browser last, also when this test panics.
    let outcome = AssertUnwindSafe(scenario(&server, &browser)).catch_unwind().await;
    browser.quit().await;
    server.stop().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario(server: &liverec::Server, browser: &Browser) {
    browser.navigate(&format!("{}/", server.url())).await;

    // The demo user's list arrives over SSE, with titles from the catalogue.
    let before: Vec<(String, String)> =
        eventually("the dashboard to show the demo user's list with titles", || async {
            let rows = shown_list(browser).await;
            (!rows.is_empty() && rows.iter().all(|(id, title)| title != id)).then_some(rows)
        })
        .await;
    let (first, first_title) = before[0].clone();
    let catalogue = get(server, &format!("/v1/items/{first}")).await;
    assert_eq!(catalogue.status, 200);
    assert_eq!(catalogue.body["title"].as_str(), Some(first_title.as_str()), "the title shown is the catalogue's");
    let rec_id = browser.script("return document.querySelector('#recs').dataset.recId;").await;
    let rec_id = rec_id.as_str().expect("the list carries its rec_id").to_owned();
    assert_eq!(browser.text("#stream-state").await, "live");

    // Click the first item, as a user would (WebDriver moves the pointer and clicks).
    let clicked = eventually("a click on the first item", || async {
        let elements = browser.find_all("#recs li[data-item]").await.ok()?;
        let element = elements.first()?;
        let item = browser.attribute(element, "data-item").await.ok()?;
        browser.click(element).await.ok()?;
        Some(item)
    })
    .await;
    assert_eq!(clicked, first, "the list did not change between reading and clicking");

    // The server pushes a new list without the clicked item, and the page shows it.
    let after = eventually("a different list without the clicked item", || async {
        let rows = shown_list(browser).await;
        let ids: Vec<String> = rows.into_iter().map(|(id, _)| id).collect();
        let old: Vec<String> = before.iter().map(|(id, _)| id.clone()).collect();
        (!ids.is_empty() && ids != old && !ids.contains(&clicked)).then_some(ids)
    })
    .await;
    assert!(!after.contains(&clicked));

    // The click reached the server as a click on the list the page showed.
    let current = get(server, &format!("/v1/users/{USER}/recommendations")).await;
    assert_eq!(current.status, 200);
    assert!(current.body["last_event_id"].is_string(), "the list reflects an event: {}", current.body);
    assert_eq!(items(&current.body), after, "the page shows the server's current list");
    eventually("the click in the user's profile", || async {
        let export = get(server, &format!("/v1/users/{USER}/export")).await;
        export.body["profile"]["interactions"]
            .as_array()?
            .iter()
            .find(|i| i["item_id"] == json!(clicked) && i["event_type"] == "click" && i["rec_id"] == json!(rec_id))?;
        Some(())
    })
    .await;
    eventually("the monitor to attribute the click", || async {
        (metric(server, "liverec_monitor_clicks_total").await >= 1.0).then_some(())
    })
    .await;

    // The polled panels fill in: the CTR table counts the click, the latency table has its rows,
    // the drift meters and the serving version are shown, and the demo log saw the round trip.
    eventually("the CTR panel to count the click", || async {
        let clicks = browser
            .script("return Array.from(document.querySelectorAll('#ctr tbody tr[data-version] td:nth-child(4)')).map(td => td.textContent);")
            .await;
        clicks.as_array()?.iter().any(|c| c.as_str().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0) >= 1).then_some(())
    })
    .await;
    let models = get(server, "/v1/admin/models").await;
    let serving = models.body["serving"].as_str().expect("serving").to_owned();
    eventually("the serving version and the panels", || async {
        let shown = browser.text("#serving").await;
        let latency_rows = browser.script("return document.querySelectorAll('#latency tbody tr').length;").await;
        let meters = browser.script("return document.querySelectorAll('#drift [data-drift]').length;").await;
        let sessions = browser.text("#sessions").await;
        (shown.contains(&serving)
            && latency_rows == json!(5)
            && meters == json!(4)
            && sessions.parse::<u64>().is_ok_and(|n| n >= 1))
        .then_some(())
    })
    .await;
    eventually("the demo log to report the round trip", || async {
        browser.text("#demo-log").await.contains("reflects the click").then_some(())
    })
    .await;
    let state = browser.script("return document.querySelector('#status').dataset.state;").await;
    assert_eq!(state, "ok", "the status line reports a failure: {}", browser.text("#status").await);
}

/// `(item id, title shown)` of every row of the demo list.
async fn shown_list(browser: &Browser) -> Vec<(String, String)> {
    let rows = browser
        .script(
            "return Array.from(document.querySelectorAll('#recs li[data-item]'))\
               .map(li => [li.dataset.item, li.querySelector('.title').textContent]);",
        )
        .await;
    rows.as_array()
        .expect("an array")
        .iter()
        .map(|row| (row[0].as_str().expect("id").to_owned(), row[1].as_str().expect("title").to_owned()))
        .collect()
}

/// chromedriver on a free loopback port, in a process group of its own so that dropping the
/// guard kills it and every browser process it started.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    fn spawn() -> ChromeDriver {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: install the Debian package chromium (scripts/test does)"
        );
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {CHROMEDRIVER} ({e}): install the Debian package chromium-driver (scripts/test does)"
                )
            });
        ChromeDriver { child, url: format!("http://127.0.0.1:{port}") }
    }

    async fn wait_ready(&self) {
        let http = webdriver_client();
        eventually("chromedriver to be ready", || async {
            let mut response = http.get(format!("{}/status", self.url)).send().await.ok()?;
            let status: Value = response.json().await.ok()?;
            (status["value"]["ready"] == true).then_some(())
        })
        .await;
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Browser start-up on a loaded machine can take several seconds: a longer timeout than the
/// support client's.
fn webdriver_client() -> awc::Client {
    awc::Client::builder().timeout(Duration::from_secs(60)).finish()
}

/// One WebDriver session of a headless Chromium.
struct Browser {
    http: awc::Client,
    session: String,
}

impl Browser {
    async fn open(driver: &ChromeDriver) -> Browser {
        let http = webdriver_client();
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--no-default-browser-check", "--window-size=1280,1000"]
            }
        }}});
        let value = send(&http, Method::POST, &format!("{}/session", driver.url), Some(capabilities))
            .await
            .unwrap_or_else(|e| panic!("cannot start a Chromium session through chromedriver: {e}"));
        let session = value["sessionId"].as_str().expect("a session id").to_owned();
        Browser { http, session: format!("{}/session/{session}", driver.url) }
    }

    async fn command(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        send(&self.http, method, &format!("{}{path}", self.session), body).await
    }

    async fn navigate(&self, url: &str) {
        self.command(Method::POST, "/url", Some(json!({ "url": url }))).await.expect("navigate");
    }

    async fn script(&self, script: &str) -> Value {
        self.command(Method::POST, "/execute/sync", Some(json!({ "script": script, "args": [] })))
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    async fn text(&self, selector: &str) -> String {
        let script = format!("const n = document.querySelector({}); return n ? n.textContent : null;", json!(selector));
        self.script(&script).await.as_str().unwrap_or_else(|| panic!("no element {selector}")).to_owned()
    }

    async fn find_all(&self, selector: &str) -> Result<Vec<String>, String> {
        let found = self
            .command(Method::POST, "/elements", Some(json!({ "using": "css selector", "value": selector })))
            .await?;
        Ok(found.as_array().into_iter().flatten().filter_map(|e| e[ELEMENT].as_str().map(str::to_owned)).collect())
    }

    async fn attribute(&self, element: &str, name: &str) -> Result<String, String> {
        let value = self.command(Method::GET, &format!("/element/{element}/attribute/{name}"), None).await?;
        value.as_str().map(str::to_owned).ok_or_else(|| format!("no attribute {name}"))
    }

    async fn click(&self, element: &str) -> Result<(), String> {
        self.command(Method::POST, &format!("/element/{element}/click"), Some(json!({}))).await.map(drop)
    }

    async fn quit(&self) {
        let _ = self.command(Method::DELETE, "", None).await;
    }
}

/// One WebDriver command: the `value` of a success, or the error it answered.
async fn send(http: &awc::Client, method: Method, url: &str, body: Option<Value>) -> Result<Value, String> {
    let request = http.request(method, url);
    let response = match body {
        Some(body) => {
            request.insert_header(("content-type", "application/json; charset=utf-8")).send_body(body.to_string()).await
        }
        None => request.send().await,
    };
    let mut response = response.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let answer: Value = response.json().limit(16 << 20).await.map_err(|e| format!("{url}: {e}"))?;
    if status.is_success() {
        Ok(answer["value"].clone())
    } else {
        Err(format!("{url}: {status} {}", answer["value"]))
    }
}
