"""Helpers for browser tests of the review app: a live server, Debian's Chromium under Playwright, logins,
screenshots, and samples with real (generated) images.

    from tests.annotate.browser import live_server, chromium_page, login, shot

    with live_server(settings) as base, chromium_page() as page:
        login(page, base, "rater1", "password-1")
        shot(page, "review-start")

Playwright only drives ``/usr/bin/chromium`` (``apt-get install -y chromium``); it never downloads a browser. Without
Chromium, :func:`require_chromium` skips the test with the reason, except under ``CI=true``, where it fails.
Screenshots go to ``test-artifacts/`` at the repository root (git-ignored).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage
    from playwright.sync_api import Page
    from sqlalchemy.orm import Session

    from mcie.config import Settings
    from mcie.db.models import Instance
    from mcie.db.store import ImageStore

CHROMIUM = Path(os.environ.get("MCIE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
VIEWPORT = {"width": 1500, "height": 1000}


def require_chromium() -> Path:
    """The Chromium binary; skips the test when it is missing (fails under ``CI=true``)."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (Playwright must not download one)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests need Chromium under CI=true: {reason}")
    pytest.skip(f"browser test skipped: {reason}")
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(settings: Settings, **app_kwargs: Any) -> Iterator[str]:
    """The app of ``settings`` served by uvicorn in a thread on a free port; yields its base URL, stops it after."""
    import uvicorn

    from mcie.annotate.web.server import create_app

    app = create_app(settings, **app_kwargs)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"mcie-test-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextmanager
def chromium_page(viewport: dict[str, int] | None = None) -> Iterator[Page]:
    """A fresh page in a fresh headless Chromium (its own cookies), closed afterwards."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=list(CHROMIUM_ARGS))
        try:
            context = browser.new_context(viewport=viewport or VIEWPORT)
            page = context.new_page()
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()


def login(page: Page, base_url: str, username: str, password: str, *, next_path: str | None = None) -> None:
    """Log in through the form with the keyboard only (the username field has the focus) and wait for the page it
    leads to."""
    target = f"{base_url}/login" + (f"?next={next_path}" if next_path else "")
    page.goto(target)
    page.wait_for_function("document.activeElement && document.activeElement.id === 'username'")
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    with page.expect_navigation():
        page.keyboard.press("Enter")


def shot(page: Page, name: str) -> Path:
    """Save a full-page screenshot as ``test-artifacts/<name>.png``; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_for_sample(page: Page, *, not_key: str | None = None, timeout_ms: int = 15_000) -> str:
    """Wait until the review screen shows a sample (another one than ``not_key``); returns its key."""
    page.wait_for_function(
        """(old) => { const el = document.querySelector('#sample-view .mcie-sample');
                      return el && el.dataset.sampleKey && el.dataset.sampleKey !== old
                             && !el.dataset.sampleKey.startsWith('empty'); }""",
        arg=not_key or "",
        timeout=timeout_ms,
    )
    return str(page.get_attribute("#sample-view .mcie-sample", "data-sample-key"))


def shown_sample_id(page: Page) -> int:
    return int(page.get_attribute("#sample-view .mcie-sample", "data-sample-id") or 0)


def wait_images_loaded(page: Page, selector: str = "#sample-view img", timeout_ms: int = 15_000) -> None:
    page.wait_for_function(
        "(sel) => [...document.querySelectorAll(sel)].every(i => i.complete && i.naturalWidth > 0)",
        arg=selector,
        timeout=timeout_ms,
    )


# ----------------------------------------------------------------------------------------------------------
# data with real images


def scene_image(seed: int, step: int, size: tuple[int, int] = (320, 240)) -> PILImage:
    """A small synthetic photo-like PIL image: a background and a few shapes; ``step`` adds one more edit."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(rng.randrange(120, 230) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, int(height * 0.65), width, height], fill=(90, 140, 80))
    for k in range(3 + step):
        rng_k = random.Random(seed * 100 + k)
        x, y = rng_k.randrange(10, width - 80), rng_k.randrange(10, height - 80)
        colour = tuple(rng_k.randrange(0, 255) for _ in range(3))
        shape = draw.ellipse if k % 2 else draw.rectangle
        shape([x, y, x + rng_k.randrange(30, 70), y + rng_k.randrange(30, 70)], fill=colour)
    return image


def make_image_instance(session: Session, store: ImageStore, n_turns: int, seed: int) -> Instance:
    """An instance whose source and turn results are real images in ``store`` (and rows in ``images``)."""
    from mcie.db.models import Instance, Operation, Turn
    from mcie.db.store import register_images

    stored = [store.put_pil(scene_image(seed, step)) for step in range(n_turns + 1)]
    register_images(session, stored)
    session.flush()
    instance = Instance(dataset="browser", external_id=f"scene-{seed}", source_image=stored[0].sha256,
                        n_turns=n_turns)
    session.add(instance)
    session.flush()
    operations = (Operation.add, Operation.change, Operation.remove)
    for k in range(1, n_turns + 1):
        session.add(Turn(instance_id=instance.id, index=k, instruction=f"edit {k} of scene {seed}",
                         operation=operations[(k - 1) % 3], result_image=stored[k].sha256))
    session.flush()
    return instance
