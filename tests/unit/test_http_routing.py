"""The router's checks, one at a time, on a real SQLite database: what each setting changes, and
the answers HTTP itself asks for. The API's behaviour end to end is in tests/integration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fabricatord.config import Settings
from fabricatord.db import open_database
from fabricatord.db.audit import AuditLog
from fabricatord.servers.http import router
from fabricatord.servers.http.department import Department
from fabricatord.servers.http.routing import Call, Reply, Router
from fabricatord.workflow.access import Directory

PASSWORD = "a long enough password"


def _router(make_settings: Callable[..., Settings], http: str = "") -> tuple[Router, Directory]:
    settings = make_settings(f"[http]\n{http}")
    database = open_database(settings.database_url)
    directory = Directory(database, session_idle=3600)
    return router(Department(settings, database, directory, AuditLog(database))), directory


def _call(table: Router, method: str, path: str, **fields: Any) -> Reply:
    call = Call(
        method=method,
        path=path,
        params={},
        query=fields.pop("query", {}),
        headers=fields.pop("headers", {}),
        body=fields.pop("body", b""),
        cookies=fields.pop("cookies", {}),
        client="127.0.0.1:1",
    )
    route, call.params = table.resolve(method, path)
    return table.handle(route, call)


def test_status_is_open_unless_the_setting_closes_it(make_settings: Callable[..., Settings]) -> None:
    table, _ = _router(make_settings)
    assert _call(table, "GET", "/api/v1/status").status == 200
    closed, _ = _router(make_settings, "status_requires_login = true")
    assert _call(closed, "GET", "/api/v1/status").status == 401
    assert _call(closed, "GET", "/healthz").status == 200  # health and metrics stay open


def test_the_session_cookie_is_secure_over_https_or_when_the_setting_says_so(
    make_settings: Callable[..., Settings],
) -> None:
    for setting, https, secure in (
        ("cookie_secure = false", False, False),
        ("cookie_secure = true", False, True),
        ("cookie_secure = false", True, True),
    ):
        table, _ = _router(make_settings, setting)
        call = Call("GET", "/", {}, {}, {}, b"", {}, "127.0.0.1", secure=https)
        cookie = table.session_cookie(call, "secret")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert ("Secure" in cookie.split("; ")) is secure


def test_a_fresh_install_says_how_to_make_the_first_admin(make_settings: Callable[..., Settings]) -> None:
    table, directory = _router(make_settings)
    page = _call(table, "GET", "/login")
    assert page.status == 200 and b"fabricatord users add NAME --role admin" in page.body
    assert any(name == "Set-Cookie" and "Path=/login" in value for name, value in page.headers)
    directory.add("first", "admin", PASSWORD)
    assert b"fabricatord users add" not in _call(table, "GET", "/login").body


def test_a_form_carries_its_csrf_token_in_a_field(make_settings: Callable[..., Settings]) -> None:
    table, directory = _router(make_settings)
    directory.add("frank", "test_write", PASSWORD)
    signed = directory.sign_in("frank", PASSWORD)
    cookies = {"fabricatord_session": signed.secret}
    form = {"content-type": "application/x-www-form-urlencoded"}
    refused = _call(table, "POST", "/logout", cookies=cookies, headers=form, body=b"csrf_token=wrong")
    assert refused.status == 403
    token = signed.identity.csrf_token.encode()
    answer = _call(table, "POST", "/logout", cookies=cookies, headers=form, body=b"csrf_token=" + token)
    assert answer.status == 303 and dict(answer.headers)["Location"] == "/login"
    assert directory.identify(signed.secret, "session") is None


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("PUT", "/api/v1/studies", 405), ("GET", "/api/v1/nothing", 404), ("GET", "/static/../pyproject.toml", 404)],
)
def test_http_answers_of_the_router_itself(
    make_settings: Callable[..., Settings], method: str, path: str, status: int
) -> None:
    table, _ = _router(make_settings)
    with pytest.raises(Exception) as raised:
        _call(table, method, path)
    assert getattr(raised.value, "status", None) == status
    if status == 405:
        assert dict(getattr(raised.value, "headers", ()))["Allow"] == "GET"
