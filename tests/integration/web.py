"""What the console and API tests share: users made as an admin makes them, and an HTTP client
that signs in through the login form as a browser does."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PASSWORD = "correct horse battery"
_USERS = (sys.executable, "-m", "fabricatord", "users")


def add_user(config: Path, name: str, role: str, password: str = PASSWORD) -> None:
    """`fabricatord users add NAME --role ROLE --password-stdin`, as an admin types it."""
    subprocess.run(
        [*_USERS, "add", name, "--role", role, "--password-stdin", "--config", str(config)],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
        env={**os.environ, "FABRICATORD_CONFIG": ""},
        timeout=60,
    )


def users(config: Path, *args: str) -> str:
    result = subprocess.run(
        [*_USERS, *args, "--config", str(config)],
        text=True,
        check=True,
        capture_output=True,
        env={**os.environ, "FABRICATORD_CONFIG": ""},
        timeout=60,
    )
    return result.stdout.strip()


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Client:
    """One browser-like caller: a cookie jar, or a bearer token."""

    port: int
    token: str = ""
    jar: http.cookiejar.CookieJar = field(default_factory=http.cookiejar.CookieJar)
    csrf: str = ""

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        csrf: bool = True,
    ) -> Answer:
        sent_headers = dict(headers or {})
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            sent_headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            sent_headers["Content-Type"] = "application/json"
        if self.token:
            sent_headers["Authorization"] = f"Bearer {self.token}"
        if csrf and self.csrf and method != "GET":
            sent_headers.setdefault("X-CSRF-Token", self.csrf)
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method, headers=sent_headers
        )
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirects())
        try:
            with opener.open(request, timeout=120) as response:
                return Answer(response.status, response.read(), dict(response.headers))
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.read(), dict(error.headers))

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, **options: Any) -> Answer:
        return self.request("POST", path, body if body is not None else {}, **options)

    def login(self, name: str, password: str = PASSWORD) -> Answer:
        form = self.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None, form.text
        answer = self.request(
            "POST", "/login", form={"username": name, "password": password, "csrf_token": token.group(1), "next": "/"}
        )
        if answer.status == 303:
            self.csrf = self.get("/api/v1/me").json()["csrf_token"]
        return answer
