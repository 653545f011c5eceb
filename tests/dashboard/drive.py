#!/usr/bin/env python3
"""Drives the shardmq dashboard in a real headless Chromium (Debian's chromium and
chromium-driver) through Selenium, for tests/dashboard.rs.

    drive.py --url http://127.0.0.1:PORT/ --token TOKEN --nodes 1,2,3 [--leader N --members 1,2,3]
             [--kick CLIENT_ID --kick-node N] [--traffic] [--subscription 'CLIENT FILTER']
             [--retained TOPIC --retained-payload TEXT] [--setting KEY=VALUE]

Steps: the login refuses a wrong token with a message and shows no dashboard; the right token
opens it; the nodes table lists exactly the nodes of --nodes, the cluster section names --leader
as the Raft leader and lists --members (without either, a standalone node shows no cluster section);
the rate chart takes samples (and shows a non-zero inbound rate with --traffic); the clients
view finds --kick by its prefix on --kick-node and its Kick button, confirmed, disconnects it
(the caller checks the MQTT side). --subscription 'CLIENT FILTER' must be listed in the
subscriptions view; --retained TOPIC is found by its prefix, viewed (--retained-payload is its
text) and deleted. --setting KEY=VALUE is set from the settings view and committed. Logging
out returns to the login. Every wait is bounded.
Prints one line per step; exits 1 with the page's text and console on a failure.

Environment: SHARDMQ_DASHBOARD_SCREENSHOTS=DIR saves PNGs of the views there (and waits a
minute of chart samples first).
"""
import argparse
import os
import sys
import tempfile
import time
import urllib.parse

# Selenium must never try to download a driver or a browser: it gets Debian's.
os.environ["SE_OFFLINE"] = "true"

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException, TimeoutException, WebDriverException)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 20


def step(text):
    print(f"step: {text}", flush=True)


class Failure(Exception):
    pass


def browser(host):
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("SHARDMQ_CHROMIUM", "/usr/bin/chromium")
    for argument in [
        "--headless=new",
        "--no-sandbox",  # tests run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--no-first-run",
        "--no-default-browser-check",
        # Loopback only: no update checks, sync, metrics or name lookups of its own.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--no-proxy-server",
        f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {host}",
        f"--user-data-dir={tempfile.mkdtemp(prefix='shardmq-chromium-')}",
    ]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=os.environ.get("SHARDMQ_CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    return driver


def wait(driver, what, condition, timeout=WAIT):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition(d))
    except TimeoutException:
        raise Failure(f"not within {timeout} s: {what}") from None


def by_id(driver, ident):
    return driver.find_element(By.ID, ident)


def visible(driver, ident):
    return by_id(driver, ident).is_displayed()


def screenshot(driver, name):
    folder = os.environ.get("SHARDMQ_DASHBOARD_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"dashboard-{name}.png")
        # The whole page, not just the window.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, max(900, min(int(height) + 140, 2400)))
        driver.save_screenshot(path)
        driver.set_window_size(1280, 900)
        step(f"screenshot {path}")


def table_rows(driver, table):
    return driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")


def node_rows(driver):
    """The nodes table as {node: [cell texts]}, read in one script (it is redrawn every 2 s)."""
    return driver.execute_script("""
        const rows = {};
        for (const tr of document.querySelectorAll('#nodes-table tbody tr')) {
          if (tr.dataset.node) rows[tr.dataset.node] = [...tr.cells].map((td) => td.textContent);
        }
        return rows;""")


def column(driver, table, key):
    """The data-KEY attribute of every row of a table, read in one script."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#' + arguments[0] + ' tbody tr')]"
        ".map((tr) => tr.dataset[arguments[1]]).filter((v) => v !== undefined)", table, key)


def open_view(driver, name):
    by_id(driver, "tabs").find_element(By.CSS_SELECTOR, f'button[data-view="{name}"]').click()
    wait(driver, f"the {name} view shows", lambda d: visible(d, f"view-{name}"))


def click_in(row_of, selector):
    """A wait condition that clicks `selector` in the row `row_of` finds, found again on every
    try (a table may be redrawn under a click)."""
    def attempt(d):
        row = row_of(d)
        buttons = row.find_elements(By.CSS_SELECTOR, selector) if row else []
        if not buttons:
            return False
        buttons[0].click()
        return True
    return attempt


def log_in(driver, token):
    field = by_id(driver, "token")
    field.clear()
    field.send_keys(token)
    by_id(driver, "login-button").click()


def run(driver, args):
    driver.get(args.url)
    wait(driver, "the login form shows", lambda d: visible(d, "login"))
    if visible(driver, "app"):
        raise Failure("the dashboard shows before a login")
    screenshot(driver, "login")

    step("a wrong token is refused")
    log_in(driver, args.token + "-wrong")
    wait(driver, "the login says the token is wrong",
         lambda d: "401" in by_id(d, "login-message").text)
    if visible(driver, "app") or not visible(driver, "login"):
        raise Failure("a wrong token opened the dashboard")
    step(f"login message: {by_id(driver, 'login-message').text}")

    step("the right token opens the dashboard")
    log_in(driver, args.token)
    wait(driver, "the dashboard shows", lambda d: visible(d, "app") and not visible(d, "login"))

    expected = sorted(args.nodes.split(","))
    step(f"the nodes table lists nodes {expected}")
    wait(driver, f"nodes {expected} listed, each with a version",
         lambda d: sorted(node_rows(d)) == expected
         and all(cells[3] not in ("", "—") for cells in node_rows(d).values()))
    for node, cells in sorted(node_rows(driver).items()):
        step(f"node row {node}: {' | '.join(cells)}")
    if args.leader:
        wait(driver, f"node {args.leader} shown as the Raft leader",
             lambda d: d.find_element(By.CSS_SELECTOR, '#cluster-facts dd[data-fact="Raft leader"]').text
             == args.leader)
        # Marked in the nodes table if listed there, and no other node is.
        wait(driver, "the leader's row marked",
             lambda d: args.leader not in node_rows(d) or node_rows(d)[args.leader][9] == "leader")
        for node, cells in node_rows(driver).items():
            if node != args.leader and cells[9] == "leader":
                raise Failure(f"node {node} is also shown as leader")
    if args.members:
        members = sorted(args.members.split(","))
        wait(driver, f"members {members} in the cluster section",
             lambda d: sorted(d.execute_script(
                 "return [...document.querySelectorAll('#members-table tbody tr')].map((tr) => tr.dataset.node)"))
             == members)
        step(f"members table lists {members}")
    if not args.leader and not args.members:
        step("a standalone node shows no cluster section and no settings")
        wait(driver, "no cluster section on a standalone node",
             lambda d: not visible(d, "cluster-section")
             and node_rows(d).get(expected[0], [""] * 3)[1:3] == ["standalone", "self"])
        open_view(driver, "settings")
        wait(driver, "the settings view says they need a cluster",
             lambda d: "only on a clustered node" in by_id(d, "settings-message").text)
        open_view(driver, "overview")

    step("the rate chart samples every 2 s")
    chart = by_id(driver, "rates-chart")
    wait(driver, "3 chart samples", lambda d: int(chart.get_attribute("data-samples") or 0) >= 3)
    if args.traffic:
        wait(driver, "a non-zero inbound rate",
             lambda d: not by_id(d, "rates-now").text.startswith("now: 0 in"))
        step(f"rates: {by_id(driver, 'rates-now').text}")
    if os.environ.get("SHARDMQ_DASHBOARD_SCREENSHOTS"):
        # A minute of samples, so that the chart in the screenshot shows a curve.
        wait(driver, "30 chart samples", lambda d: int(chart.get_attribute("data-samples") or 0) >= 30, 90)
    screenshot(driver, "overview")

    open_view(driver, "clients")
    if args.kick:
        step(f"the clients table lists {args.kick!r} on node {args.kick_node}")
        prefix = by_id(driver, "clients-prefix")
        prefix.clear()
        prefix.send_keys(args.kick[:-1])

        def row_of(d):
            for row in table_rows(d, "clients-table"):
                if row.get_attribute("data-client-id") == args.kick:
                    return row
            return None

        wait(driver, f"a row for {args.kick!r}, and only rows of the prefix",
             lambda d: row_of(d) is not None
             and all(i.startswith(args.kick[:-1]) for i in column(d, "clients-table", "clientId")))
        cells = wait(driver, "the row's cells",
                     lambda d: [c.text for c in row_of(d).find_elements(By.TAG_NAME, "td")])
        step(f"client row: {' | '.join(cells)}")
        if cells[1] != args.kick_node:
            raise Failure(f"client {args.kick!r} shown on node {cells[1]!r}, not {args.kick_node}")
        screenshot(driver, "clients")
        wait(driver, "the Kick button clicked", click_in(row_of, 'button[data-action="ask"]'))
        wait(driver, "the kick confirmed", click_in(row_of, 'button[data-action="confirm"]'))
        wait(driver, "the page says the client was kicked",
             lambda d: by_id(d, "clients-message").text.startswith("Kicked"))
        step(f"clients message: {by_id(driver, 'clients-message').text}")

    if args.subscription:
        client, filter_ = args.subscription.split(" ", 1)
        step(f"the subscriptions view lists {client!r} on {filter_!r}")
        open_view(driver, "subscriptions")
        wait(driver, "the subscription listed",
             lambda d: [client, filter_] in d.execute_script(
                 "return [...document.querySelectorAll('#subscriptions-table tbody tr')]"
                 ".map((tr) => [...tr.cells].map((td) => td.textContent)).map((c) => [c[0], c[2]])"))
        wait(driver, f"the route of {filter_!r} listed", lambda d: filter_ in column(d, "routes-table", "filter"))
        screenshot(driver, "subscriptions")

    if args.retained:
        step(f"the retained view shows {args.retained!r} and deletes it")
        open_view(driver, "retained")
        prefix = by_id(driver, "retained-prefix")
        prefix.clear()
        prefix.send_keys(args.retained[:-1])
        by_id(driver, "retained-form").submit()

        def retained_row(d):
            for row in table_rows(d, "retained-table"):
                if row.get_attribute("data-topic") == args.retained:
                    return row
            return None

        wait(driver, "its row, and only rows of the prefix",
             lambda d: retained_row(d) is not None
             and all(t.startswith(args.retained[:-1]) for t in column(d, "retained-table", "topic")))
        wait(driver, "View clicked", click_in(retained_row, "button"))
        wait(driver, "its payload shown as text",
             lambda d: visible(d, "retained-detail") and by_id(d, "retained-payload").text == args.retained_payload)
        screenshot(driver, "retained")
        detail = lambda d: d.find_element(By.ID, "retained-detail")  # noqa: E731
        wait(driver, "Delete clicked", click_in(detail, 'button[data-action="ask"]'))
        wait(driver, "the delete confirmed", click_in(detail, 'button[data-action="confirm"]'))
        wait(driver, "the page says it was deleted, and the row is gone",
             lambda d: by_id(d, "retained-message").text.startswith("Deleted") and retained_row(d) is None)

    if args.setting:
        key, value = args.setting.split("=", 1)
        step(f"the settings view sets {key} = {value}")
        open_view(driver, "settings")
        for ident, text in (("settings-key", key), ("settings-value", value)):
            field = by_id(driver, ident)
            field.clear()
            field.send_keys(text)
        by_id(driver, "settings-form").find_element(By.CSS_SELECTOR, "button").click()
        wait(driver, "the page says it was committed",
             lambda d: by_id(d, "settings-message").text.startswith(f"Set {key} = {value}: committed"))
        wait(driver, "the table shows the new value",
             lambda d: d.execute_script(
                 "const tr = document.querySelector('#settings-table tbody tr[data-key=\"' + arguments[0] + '\"]');"
                 "return tr ? tr.cells[1].textContent : null", key) == value)
        screenshot(driver, "settings")

    if os.environ.get("SHARDMQ_DASHBOARD_SCREENSHOTS"):
        open_view(driver, "overview")
        driver.set_window_size(420, 900)
        time.sleep(0.5)
        folder = os.environ["SHARDMQ_DASHBOARD_SCREENSHOTS"]
        driver.save_screenshot(os.path.join(folder, "dashboard-narrow.png"))
        driver.set_window_size(1280, 900)

    step("logging out returns to the login")
    by_id(driver, "logout").click()
    wait(driver, "the login shows again", lambda d: visible(d, "login") and not visible(d, "app"))
    if driver.execute_script("return sessionStorage.length") != 0:
        raise Failure("the token is still in session storage after logout")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--nodes", required=True, help="node ids the table must list, comma-separated")
    parser.add_argument("--leader")
    parser.add_argument("--members", help="node ids the cluster section's members table must list")
    parser.add_argument("--kick")
    parser.add_argument("--kick-node")
    parser.add_argument("--traffic", action="store_true")
    parser.add_argument("--subscription", help="'CLIENT_ID FILTER' the subscriptions view must list")
    parser.add_argument("--retained", help="a retained topic the retained view must show, then delete")
    parser.add_argument("--retained-payload", help="its payload (text)")
    parser.add_argument("--setting", help="KEY=VALUE to set in the settings view")
    args = parser.parse_args()
    driver = browser(urllib.parse.urlsplit(args.url).hostname)
    try:
        run(driver, args)
        step("done")
        return 0
    except (Failure, WebDriverException) as error:
        print(f"FAILED: {error}", flush=True)
        try:
            print("--- page text ---\n" + driver.find_element(By.TAG_NAME, "body").text)
            for entry in driver.get_log("browser"):
                print(f"console: {entry.get('level')} {entry.get('message')}")
        except WebDriverException:
            pass
        return 1
    finally:
        driver.quit()


if __name__ == "__main__":
    sys.exit(main())
