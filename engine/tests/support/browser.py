#!/usr/bin/env python3
"""A real browser (headless Chromium through chromedriver) that a test
drives one command per line on stdin; each gets one line back on stdout:
"ok TEXT" or "error TEXT". Waits poll the live page (no reload) for up to
TIMEOUT seconds.

  open URL | shot NAME | marker_set | marker_check
  wait_rows SELECTOR N            N rows match the CSS selector
  wait_gone SELECTOR              no element matches it
  wait_progress                   #rebuild-progress shows 0 < value < max
  text SELECTOR                   the element's text
  type SELECTOR TEXT | click SELECTOR
  act SELECTOR                    clicks it, returns the status line it led to
  count SELECTOR
"""
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

TIMEOUT = float(os.environ.get("BROWSER_TIMEOUT", "60"))
artifacts = sys.argv[1]
os.makedirs(artifacts, exist_ok=True)

opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
          "--window-size=1200,1500"]:
    opts.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def wait(what, f):
    end = time.time() + TIMEOUT
    while time.time() < end:
        try:
            r = f()
        except Exception:  # the page is mid-refresh: try again
            r = None
        if r:
            return r
        time.sleep(0.1)
    d.save_screenshot(os.path.join(artifacts, "timeout.png"))
    raise RuntimeError("timed out waiting for " + what)


def rows(sel):
    return d.find_elements(By.CSS_SELECTOR, sel)


def progress():
    p = d.find_element(By.ID, "rebuild-progress")
    v, m = float(p.get_attribute("value")), float(p.get_attribute("max"))
    return 0 < v < m and f"{v:.0f} of {m:.0f}"


def run(cmd, arg):
    if cmd == "open":
        d.get(arg)
        return d.title
    if cmd == "shot":
        path = os.path.join(artifacts, arg + ".png")
        d.save_screenshot(path)
        return path
    if cmd == "marker_set":
        d.execute_script("window.rvolMarker = 42")
        return "set"
    if cmd == "marker_check":
        if d.execute_script("return window.rvolMarker") != 42:
            raise RuntimeError("the page was reloaded")
        return "the same page"
    if cmd == "wait_rows":
        sel, n = arg.rsplit(" ", 1)
        return str(len(wait(f"{n} × {sel}", lambda: len(rows(sel)) == int(n) and rows(sel))))
    if cmd == "wait_gone":
        wait(f"no {arg}", lambda: not rows(arg))
        return "gone"
    if cmd == "wait_progress":
        return wait("a rebuild's progress", progress)
    if cmd == "text":
        return wait(arg, lambda: d.find_element(By.CSS_SELECTOR, arg).text)
    if cmd == "type":
        sel, text = arg.split(" ", 1)
        e = d.find_element(By.CSS_SELECTOR, sel)
        e.clear()
        e.send_keys(text)
        return "typed"
    if cmd == "click":
        d.find_element(By.CSS_SELECTOR, arg).click()
        return "clicked"
    if cmd == "act":
        n = d.find_element(By.ID, "notice")
        before = n.get_attribute("data-seq")
        d.find_element(By.CSS_SELECTOR, arg).click()
        return wait("the status line", lambda: n.get_attribute("data-seq") != before and n.text)
    if cmd == "count":
        return str(len(rows(arg)))
    raise RuntimeError("unknown command " + cmd)


print("ok ready", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "quit":
        break
    try:
        out = run(cmd, arg)
        print("ok " + " ".join(str(out).split()), flush=True)
    except Exception as e:  # the test reads the reason
        print("error " + " ".join(str(e).split())[:500], flush=True)
for entry in d.get_log("browser"):
    if entry.get("level") == "SEVERE" and "favicon" not in entry.get("message", ""):
        print("console " + entry["message"], file=sys.stderr, flush=True)
d.quit()
