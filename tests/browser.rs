//! The export page in a real browser: Debian's Chromium, headless, driven through chromedriver
//! (WebDriver) against the API router served on loopback, with the real emulator behind it and
//! the worker playing the queue. A person's path: open the page with the dev token, pick orders,
//! a few columns and XLSX, start, watch the progress reach 100%, download, and the file holds the
//! rows. A screenshot of the finished page is saved under `target/browser/`.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`, `chromium-driver`); `make test`
//! installs them when they are missing, and this test fails, saying so, when they are not there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use integration_tests::Stack;

const ROWS: u64 = 2_000;

/// chromedriver on a free port, killed when the test ends however it ends.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn find(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} not found: install Debian's chromium and chromium-driver (make test does)")
        })
}

async fn driver() -> Driver {
    let port = free_port();
    let child = Command::new(find("chromedriver"))
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Driver { child, url }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": find("chromium"),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1100,1500"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_exports_orders_as_xlsx_from_the_page() {
    let stack = Arc::new(Stack::new(ROWS, &[]).await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let app = api::router(stack.deps.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let worker = {
        let stack = stack.clone();
        tokio::spawn(async move {
            loop {
                stack.run_worker_once().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/browser");
    let downloads = out.join("downloads");
    let _ = std::fs::remove_dir_all(&downloads);
    std::fs::create_dir_all(&downloads).unwrap();

    let driver = driver().await;
    let c = browser(&driver).await;
    let token = stack.token("acme", &["exports:read", "exports:admin"]);
    c.goto(&format!("{api}/#token={token}")).await.unwrap();
    // The token in the fragment loads the datasets at once.
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("#dataset option[value=orders]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Id("no-columns"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    for column in ["order_id", "status", "amount"] {
        c.find(Locator::Css(&format!("#columns input[value={column}]")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }
    c.find(Locator::Css("#format option[value=xlsx]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Id("start"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = text(&c, "#job-status").await;
        let class = c
            .find(Locator::Id("job-status"))
            .await
            .unwrap()
            .attr("class")
            .await
            .unwrap()
            .unwrap_or_default();
        if class == "done" {
            assert!(
                status.contains(&format!("{ROWS}")) || status.contains("2,000"),
                "{status}"
            );
            break;
        }
        assert!(class != "error", "the job failed: {status}");
        assert!(
            text(&c, "#export-error").await.is_empty(),
            "{}",
            text(&c, "#export-error").await
        );
        assert!(Instant::now() < deadline, "no result after 120 s: {status}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let value = c
        .execute("return document.getElementById('bar').value", vec![])
        .await
        .unwrap();
    assert_eq!(value.as_f64(), Some(1.0), "the progress bar ends full");
    let stats = text(&c, "#stats").await;
    assert!(stats.contains("orders"), "cache stats: {stats}");
    std::fs::write(out.join("export-page.png"), c.screenshot().await.unwrap()).unwrap();

    // The link the person clicks: a presigned URL of the file (headless Chromium does not save
    // downloads where a test can wait for them, so the test fetches what the link points at).
    let link = c.find(Locator::Css("a.download")).await.unwrap();
    let href = link
        .attr("href")
        .await
        .unwrap()
        .expect("the download link has a URL");
    let (status, headers, body) = stack.fetch(&href).await;
    assert!(status.is_success(), "{status}");
    let disposition = headers["content-disposition"].to_str().unwrap();
    assert!(
        disposition.starts_with("attachment;") && disposition.contains(".xlsx"),
        "{disposition}"
    );
    let file = downloads.join("orders.xlsx");
    std::fs::write(&file, body).unwrap();
    c.close().await.unwrap();
    worker.abort();

    use calamine::Reader;
    let mut book: calamine::Xlsx<_> = calamine::open_workbook(&file).unwrap();
    let sheet = book.worksheet_range_at(0).unwrap().unwrap();
    let rows: Vec<Vec<String>> = sheet
        .rows()
        .map(|r| r.iter().map(|c| c.to_string()).collect())
        .collect();
    assert_eq!(rows[0], ["Order ID", "Status", "Amount"]);
    assert_eq!(rows.len() as u64, ROWS + 1, "header and every row");
    assert!(rows[1][0].starts_with("ORD-acme-"), "{:?}", rows[1]);
}
