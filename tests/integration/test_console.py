"""The web console in Debian's headless Chromium, driven through /usr/bin/chromedriver: what a
user clicks, checked with DCMTK, a real peer and the API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, need
from tests.integration.conftest import Daemon, findscu, halt, launch, running_peer
from tests.integration.test_acquisition import wait_for
from tests.integration.test_hl7_listener import message, msa, send
from tests.integration.web import PASSWORD, Client, add_user, users

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    folder = tmp_path_factory.mktemp("console")
    pacs_port = free_port()
    peers = (
        f'[[peers]]\nname = "pacs"\nae_title = "PACS"\nport = {pacs_port}\n'
        f'[[peers]]\nname = "prodpacs"\nae_title = "PRODPACS"\nport = {free_port()}\nenvironment = "prod"\n'
        '[[routes]]\nname = "to-pacs"\nmatch = { study_description = "ROUTED*" }\nto = ["pacs"]\nattempts = 1\n'
    )
    daemon = launch(folder, extra=peers)
    try:
        for name, role in (("ada", "admin"), ("tess", "test_write")):
            add_user(daemon.config, name, role)
        yield daemon, pacs_port
    finally:
        halt(daemon)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = need("chromium")
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(need("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: Any, daemon: Daemon, name: str) -> None:
    base = f"http://127.0.0.1:{daemon.http_port}"
    driver.get(f"{base}/login")
    driver.delete_all_cookies()
    driver.get(f"{base}/login")
    driver.find_element(By.NAME, "username").send_keys(name)
    driver.find_element(By.NAME, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    until(driver, lambda d: d.current_url == f"{base}/")
    assert driver.find_element(By.ID, "whoami").text.startswith(name)


def until(driver: Any, check: Any, seconds: float = 60) -> Any:
    try:
        # A page that reloads itself (after an action) leaves found elements stale: look again.
        return WebDriverWait(driver, seconds, ignored_exceptions=(StaleElementReferenceException,)).until(check)
    except TimeoutException:
        raise AssertionError(f"timed out on {driver.current_url}:\n{driver.page_source[:3000]}") from None


def loaded(driver: Any, image: Any) -> bool:
    return bool(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))


def token(daemon: Daemon, name: str) -> Client:
    return Client(daemon.http_port, token=users(daemon.config, "token", name))


def test_sign_in_generate_a_study_and_see_its_images(node: tuple[Daemon, int], browser: Any) -> None:
    daemon, _ = node
    sign_in(browser, daemon, "ada")
    browser.get(f"http://127.0.0.1:{daemon.http_port}/generate")
    Select(browser.find_element(By.CSS_SELECTOR, "#generate select[name=modality]")).select_by_visible_text("CT")
    browser.find_element(By.CSS_SELECTOR, "#generate input[name=images]").send_keys("2")
    browser.find_element(By.CSS_SELECTOR, "#generate input[name=description]").send_keys("CONSOLE CT")
    browser.find_element(By.CSS_SELECTOR, "#generate button[type=submit]").click()
    until(browser, lambda d: "/studies/" in d.current_url)
    uid = browser.find_element(By.ID, "study-uid").text
    assert browser.current_url.endswith(f"/studies/{uid}")
    until(browser, lambda d: loaded(d, d.find_element(By.ID, "image")))
    assert "SOPInstanceUID" in browser.find_element(By.ID, "tags").text
    browser.get(f"http://127.0.0.1:{daemon.http_port}/studies?StudyDescription=CONSOLE*")
    rows = browser.find_elements(By.CSS_SELECTOR, "#studies tr")[1:]
    assert len(rows) == 1
    thumbnail = rows[0].find_element(By.CSS_SELECTOR, "img.thumb")
    until(browser, lambda d: loaded(d, thumbnail))
    assert uid in rows[0].find_element(By.TAG_NAME, "a").get_attribute("href")


def test_a_worklist_item_made_in_the_console_is_found_by_findscu(
    node: tuple[Daemon, int], browser: Any, tmp_path: Path
) -> None:
    daemon, _ = node
    sign_in(browser, daemon, "tess")
    browser.get(f"http://127.0.0.1:{daemon.http_port}/worklist")
    browser.find_element(By.CSS_SELECTOR, "#add-item summary").click()
    Select(browser.find_element(By.CSS_SELECTOR, "#worklist-add select[name=modality]")).select_by_visible_text("MR")
    browser.find_element(By.CSS_SELECTOR, "#worklist-add input[name=station]").send_keys("WEBMR")
    browser.find_element(By.CSS_SELECTOR, "#worklist-add button[type=submit]").click()
    until(browser, lambda d: "WEBMR" in d.find_element(By.ID, "worklist").text)
    [item] = findscu(
        daemon,
        tmp_path,
        "-W",
        "AccessionNumber",
        "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=WEBMR",
        "ScheduledProcedureStepSequence[0].Modality",
    )
    assert item.ScheduledProcedureStepSequence[0].Modality == "MR"
    assert item.AccessionNumber in browser.find_element(By.ID, "worklist").text


def test_a_failed_route_job_is_retried_from_the_jobs_page_once_its_peer_is_back(
    node: tuple[Daemon, int], browser: Any, tmp_path: Path
) -> None:
    daemon, pacs_port = node
    api = token(daemon, "tess")
    made = api.post("/api/v1/generate", {"modality": "CR", "images": 1, "description": "ROUTED CR"}).json()
    study = made["study_instance_uid"]

    def jobs() -> list[dict[str, Any]]:
        return list(api.get(f"/api/v1/jobs?kind=routes&study={study}").json()["jobs"])

    wait_for(lambda: bool(jobs()) and all(job["state"] == "failed" for job in jobs()))
    [job] = jobs()
    folder = tmp_path / "pacs"
    folder.mkdir()
    storescp = ["storescp", "-aet", "PACS", "-od", str(folder), "--accept-all", str(pacs_port)]
    with running_peer(storescp, pacs_port, "ANY"):
        sign_in(browser, daemon, "tess")
        browser.get(f"http://127.0.0.1:{daemon.http_port}/jobs?study={study}")
        row = browser.find_element(By.ID, f"job-{job['id']}")
        assert "failed" in row.text
        row.find_element(By.CSS_SELECTOR, "button.retry").click()
        wait_for(lambda: jobs()[0]["state"] == "done")
        assert len(list(folder.iterdir())) == made["instances"]
    browser.refresh()
    until(browser, lambda d: "done" in d.find_element(By.ID, f"job-{job['id']}").text)


def test_a_test_write_user_sees_no_prod_button_and_is_refused_when_it_posts_anyway(
    node: tuple[Daemon, int], browser: Any
) -> None:
    daemon, _ = node
    study = token(daemon, "ada").post("/api/v1/generate", {"modality": "CR", "images": 1}).json()["study_instance_uid"]
    sign_in(browser, daemon, "tess")
    base = f"http://127.0.0.1:{daemon.http_port}"
    assert not browser.find_elements(By.LINK_TEXT, "Users")
    browser.get(f"{base}/studies/{study}")
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#send-study option")]
    assert options == ["pacs"]
    assert not browser.find_elements(By.ID, "delete-study")
    browser.get(f"{base}/peers")
    peers = browser.find_element(By.ID, "peers").text
    prod_row = next(line for line in peers.splitlines() if line.startswith("prodpacs"))
    assert "C-ECHO" not in prod_row
    assert "prodpacs" not in browser.find_element(By.ID, "move").text
    # The request the page would not offer, made by hand with the session and its CSRF token.
    answer = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", headers: {"Content-Type": "application/json",
              "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]').content},
              body: JSON.stringify({peer: "prodpacs"})})
          .then(async (r) => done([r.status, await r.text()]));
        """,
        f"/api/v1/studies/{study}/send",
    )
    assert answer[0] == 403 and "prodpacs" in answer[1]
    browser.get(f"{base}/users")
    assert "403" in browser.find_element(By.TAG_NAME, "h1").text


def test_an_hl7_message_carrying_a_script_is_shown_as_text(node: tuple[Daemon, int], browser: Any) -> None:
    daemon, _ = node
    hostile = "<script>document.body.classList.add('pwned')</script>"  # no `=`: PN keeps it
    reply = send(
        daemon,
        message(
            "XSS-1",
            f"PID|1||MRNXSS^^^TESTHOSP||{hostile}^Eve||19800101|F",
            "ORC|NW|PO-XSS|FO-XSS||SC||^^^20261124090000^^R",
            "OBR|1|PO-XSS|FO-XSS|CTABD^CT Abdomen^LOCAL||||||||||||||ACCXSS||||||CT",
        ),
    )
    assert msa(reply)[0] == "AA"
    [logged] = token(daemon, "ada").get("/api/v1/hl7/messages?control_id=XSS-1").json()["messages"]
    sign_in(browser, daemon, "ada")
    base = f"http://127.0.0.1:{daemon.http_port}"
    browser.get(f"{base}/hl7/{logged['id']}")
    assert hostile in browser.find_element(By.ID, "segments").text
    assert not browser.find_elements(By.CSS_SELECTOR, "body.pwned")
    assert "&lt;script&gt;" in browser.page_source
    browser.get(f"{base}/worklist")
    assert hostile in browser.find_element(By.ID, "worklist").text
    assert not browser.find_elements(By.CSS_SELECTOR, "body.pwned")
