"""The web page (``GET /``) in a real browser: Debian's chromium through chromium-driver and selenium, against the
session's real server (``live_server``: ``maskrcnn-serving serve``, 2 workers, the demo model). One browser serves
the whole module. Without chromium or chromium-driver the module is skipped with the reason (tests/run.sh installs both
with apt-get where it can).

What a person does on the page, checked against the API: each example image lists exactly the API's answer for the
image the page sent, at the slider's value, with boxes mapped back to the photo; a 4000x3000 photo is sent
downscaled (the server's access log has the request's size); the slider and the class checkboxes filter without a
new request; masks are drawn in the class colours of ``GET /model``, and hovering one shows that instance; an invalid
file and the server's errors (503 while loading, 413) are readable messages; the page asks nothing of any other host
and breaks no rule of its Content-Security-Policy.

``MASKRCNN_UPDATE_SCREENSHOT=1`` also writes the screenshot taken after an upload to docs/images/web-page.png.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
import requests
from pycocotools import mask as mask_utils

from maskrcnn_serving.modeling.preprocess import resized_shape
from testsupport.server import ServerProcess, ping

# pycocotools 2.0.11 under numpy 2 warns on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "images" / "web-page.png"
# Without the background-networking flags chromium makes connections of its own (updates, safe browsing, sync).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")
PAGE_SCORE_THRESHOLD = 0.05  # what the page asks the server for (app.js LOW_SCORE_THRESHOLD)
PAGE_OPTIONS = {"format": "coco", "max_detections": 100}
TIMEOUT = 120.0  # seconds for one upload on a busy 2-core machine


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return (f"no {program} on PATH: apt-get install chromium chromium-driver (tests/run.sh does so as root "
                    "where apt-get works)")
    return None


@dataclass
class Listed:
    """One instance the page lists (its DOM contract)."""

    index: int  # in the page's response
    category: str
    score: float
    bbox: tuple[float, ...]  # x, y, w, h in the photo's pixels


class Page:
    """The page in the module's browser, driven through its documented DOM contract."""

    def __init__(self, driver, downloads: Path) -> None:
        self.driver = driver
        self.downloads = downloads
        self.origins: set[str] = set()  # the servers the page was opened on

    def open(self, url: str, ready: bool = True) -> None:
        self.origins.add(url)
        self.driver.get(f"{url}/")
        if ready:
            self.wait(lambda: self.status()[1].startswith("Ready"), "the page to load the model")

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: condition(), f"waiting for {what}")

    def element(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def elements(self, selector: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def status(self) -> tuple[str, str, int]:
        """#status: data-state, the message, data-upload (the photo it is about)."""
        status = self.element("#status")
        return status.get_attribute("data-state"), status.text, int(status.get_attribute("data-upload") or 0)

    def upload(self, path: Path) -> str:
        """Give the page a photo through its input[type=file]; wait for the answer; the final data-state."""
        number = self.status()[2] + 1
        self.element("input[type=file]").send_keys(str(path))
        self.wait(lambda: self.status()[2] == number and self.status()[0] in ("done", "error"), f"{path.name}")
        return self.status()[0]

    def listed(self) -> list[Listed]:
        return [Listed(int(item.get_attribute("data-instance")), item.get_attribute("data-category"),
                       float(item.get_attribute("data-score")),
                       tuple(float(v) for v in item.get_attribute("data-bbox").split(",")))
                for item in self.elements("[data-instance]")]

    def threshold(self) -> float:
        return float(self.element("input#score-threshold").get_attribute("value"))

    def set_threshold(self, value: float) -> None:
        """Move the slider as a person would: a new value, then the input event."""
        self.driver.execute_script(
            "const slider = document.querySelector('input#score-threshold');"
            "slider.value = arguments[0]; slider.dispatchEvent(new Event('input', {bubbles: true}));", str(value))

    def class_box(self, name: str):
        return self.element(f'#class-filters input[type=checkbox][value="{name}"]')

    def stats(self) -> dict[str, str]:
        return self.driver.execute_script("return {...document.getElementById('upload-stats').dataset};")

    def download(self, element_id: str) -> bytes:
        """Click a download control; the file the browser saved."""
        for old in self.downloads.iterdir():
            old.unlink()
        self.element(f"#{element_id}").click()
        saved: list[Path] = []

        def finished() -> bool:
            # chromium writes NAME.crdownload beside an empty NAME placeholder, then renames it over NAME; its own
            # temporary files may vanish between the listing and their stat
            try:
                files = list(self.downloads.iterdir())
                saved[:] = [p for p in files if not p.name.endswith(".crdownload") and p.stat().st_size > 0]
            except FileNotFoundError:
                return False
            return len(saved) == 1 and len(files) == 1

        self.wait(finished, f"the download of #{element_id}", timeout=30)
        return saved[0].read_bytes()

    def canvas_pixel(self, x: int, y: int) -> np.ndarray:
        """The RGB of one pixel of the page's canvas."""
        return np.array(self.driver.execute_script(
            "const context = document.getElementById('canvas').getContext('2d');"
            "return Array.from(context.getImageData(arguments[0], arguments[1], 1, 1).data.slice(0, 3));", x, y))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    # The network and console logs of the whole module: read by the last test.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield Page(driver, downloads)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ helpers


def api_annotations(url: str, image: bytes, score_threshold: float) -> list[dict]:
    """The API's answer for ``image`` with the page's options at ``score_threshold``."""
    response = requests.post(f"{url}/invocations", data=image, headers={"Content-Type": "application/octet-stream"},
                             params={**PAGE_OPTIONS, "score_threshold": score_threshold}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["annotations"]


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes."""
    height, width = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
    return width, height


def access_log(live_server) -> list[dict]:
    """The server's JSON log lines."""
    lines = []
    for line in live_server.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def invocations_in(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line.get("route") == "/invocations" and line.get("method") == "POST"]


def assert_page_lists_the_api_answer(page: Page, url: str, photo: bytes) -> tuple[bytes, list[Listed]]:
    """After an upload of ``photo``: the image the page sent has the model's size or is the photo itself; the
    instances listed are the API's answer for that image at the slider's value (classes, scores, order), with
    boxes scaled back to the photo; "Download JSON" is the page's answer exactly. Returns the image sent and the
    instances listed."""
    sent = page.download("download-sent")
    stats = page.stats()
    assert int(stats["bytesSent"]) == len(sent) and int(stats["fileBytes"]) == len(photo)
    photo_width, photo_height = image_size(photo)
    resize = requests.get(f"{url}/model", timeout=10).json()["resize"]
    model_height, model_width = resized_shape(photo_height, photo_width, resize["short_edge"], resize["max_size"])
    if model_width < photo_width:  # the model would shrink it: the browser did, to the same size
        assert image_size(sent) == (model_width, model_height) and sent[:2] == b"\xff\xd8"
    else:
        assert sent == photo
    sent_width, sent_height = image_size(sent)
    assert (int(stats["sentWidth"]), int(stats["sentHeight"])) == (sent_width, sent_height)

    listed = page.listed()
    expected = api_annotations(url, sent, page.threshold())
    assert [(item.category, item.score) for item in listed] == [(a["category_name"], a["score"]) for a in expected]
    scale = np.array([photo_width / sent_width, photo_height / sent_height] * 2)
    for item, annotation in zip(listed, expected, strict=True):
        assert item.bbox == pytest.approx(tuple(np.array(annotation["bbox"]) * scale), abs=0.06)

    answer = json.loads(page.download("download-json"))
    assert answer == {"annotations": api_annotations(url, sent, PAGE_SCORE_THRESHOLD)}
    assert [(answer["annotations"][item.index]["category_name"], answer["annotations"][item.index]["score"])
            for item in listed] == [(item.category, item.score) for item in listed]
    return sent, listed


def photo_of_4000x3000(example: Path, path: Path) -> bytes:
    """A phone-sized photo: an example image cropped to 4:3, enlarged to 4000x3000 with sensor-like grain, JPEG."""
    image = cv2.imread(str(example), cv2.IMREAD_COLOR)
    height, width = image.shape[:2]
    top = (height - width * 3 // 4) // 2
    photo = cv2.resize(image[top : top + width * 3 // 4], (4000, 3000), interpolation=cv2.INTER_CUBIC)
    grain = np.random.default_rng(0).integers(-12, 13, (500, 500, 3), dtype=np.int16)
    photo = np.clip(photo + np.tile(grain, (6, 8, 1)), 0, 255).astype(np.uint8)
    data = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    path.write_bytes(data)
    return data


# ------------------------------------------------------------------------------------------------ tests


def test_each_example_image_lists_the_api_answer(page, live_server, example_images):
    page.open(live_server.url)
    model = requests.get(f"{live_server.url}/model", timeout=10).json()
    assert page.threshold() == model["default_score_threshold"]
    for path in example_images:
        assert page.upload(path) == "done", page.status()
        _, listed = assert_page_lists_the_api_answer(page, live_server.url, path.read_bytes())
        assert listed, f"the demo model finds objects in {path.name}"


def test_a_4000x3000_photo_is_sent_downscaled(page, live_server, example_images, tmp_path):
    photo_path = tmp_path / "phone-photo.jpg"
    photo = photo_of_4000x3000(example_images[3], photo_path)
    page.open(live_server.url)
    logged = len(access_log(live_server))
    assert page.upload(photo_path) == "done", page.status()
    requests_made = invocations_in(access_log(live_server)[logged:])
    assert len(requests_made) == 1 and requests_made[0]["status"] == 200
    bytes_in = requests_made[0]["bytes_in"]
    print(f"\n4000x3000 photo of {len(photo)} bytes sent as {bytes_in} bytes")
    assert bytes_in * 20 < len(photo), (bytes_in, len(photo))
    assert str(bytes_in) == page.stats()["bytesSent"]
    assert_page_lists_the_api_answer(page, live_server.url, photo)


def test_a_photo_can_be_dropped_or_pasted(page, live_server, example_images):
    """Drag and drop anywhere on the page, and paste, give the page a photo as the file picker does (the events are
    made in the page with the photo's bytes, as the browser makes them for a person)."""
    page.open(live_server.url)
    photo = example_images[2]
    expected = [(a["category_name"], a["score"]) for a in
                api_annotations(live_server.url, photo.read_bytes(), page.threshold())]  # sent as it is: 305 x 347
    make_file = ("const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
                 "const transfer = new DataTransfer();"
                 "transfer.items.add(new File([bytes], arguments[1], {type: 'image/jpeg'}));")
    events = {
        "drop": "document.getElementById('canvas-frame').dispatchEvent("
                "new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));",
        "paste": "document.body.dispatchEvent("
                 "new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true}));",
    }
    for how, event in events.items():
        number = page.status()[2] + 1
        page.driver.execute_script(make_file + event, base64.b64encode(photo.read_bytes()).decode(), photo.name)
        page.wait(lambda: page.status()[2] == number and page.status()[0] in ("done", "error"), how)  # noqa: B023
        assert page.status()[0] == "done", (how, page.status())
        assert [(item.category, item.score) for item in page.listed()] == expected, how


def test_the_slider_and_class_checkboxes_filter_without_a_new_request(page, live_server, example_images):
    page.open(live_server.url)
    assert page.upload(example_images[1]) == "done"  # 32 detections above 0.05
    sent = page.download("download-sent")
    logged = len(invocations_in(access_log(live_server)))
    shown = {}
    for value in (0.9, 0.3, 0.0, 0.5):
        page.set_threshold(value)
        shown[value] = page.listed()
        assert all(item.score > value for item in shown[value])
        # below what the page asked the server for, it says so
        assert ("0.05" in page.element("#score-note").text) == (value < PAGE_SCORE_THRESHOLD)
    assert len(shown[0.9]) < len(shown[0.5]) < len(shown[0.3]) < len(shown[0.0])

    by_class = {}
    for item in shown[0.5]:
        by_class.setdefault(item.category, []).append(item)
    hidden = max(by_class, key=lambda name: len(by_class[name]))
    page.class_box(hidden).click()
    assert page.listed() == [item for item in shown[0.5] if item.category != hidden]
    assert page.elements(f'[data-instance][data-category="{hidden}"]') == []
    page.class_box(hidden).click()
    assert page.listed() == shown[0.5]
    assert len(invocations_in(access_log(live_server))) == logged, "filtering asked the server again"

    for value in (0.9, 0.3, 0.5):  # each filter is the API's answer at that threshold
        expected = api_annotations(live_server.url, sent, value)
        assert [(i.category, i.score) for i in shown[value]] == [(a["category_name"], a["score"]) for a in expected]
    everything = api_annotations(live_server.url, sent, PAGE_SCORE_THRESHOLD)
    assert [(i.category, i.score) for i in shown[0.0]] == [(a["category_name"], a["score"]) for a in everything]


def _lone_interior_pixel(annotations: list[dict], chosen: int, canvas_per_sent: float) -> tuple[int, int]:
    """(x, y) in the image sent, deep inside mask ``chosen`` and clear of every other mask, box outline and label."""
    masks = [mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"]})
             for a in annotations]
    height, width = masks[chosen].shape
    clear = cv2.erode(masks[chosen], np.ones((9, 9), np.uint8)).astype(bool)
    margin = int(np.ceil(40 / canvas_per_sent))  # labels are ~30 canvas pixels tall; outlines a few wide
    for index, annotation in enumerate(annotations):
        if index != chosen:
            clear &= ~cv2.dilate(masks[index], np.ones((9, 9), np.uint8)).astype(bool)
        x, y, w, h = (int(round(v)) for v in annotation["bbox"])
        outline = np.zeros((height, width), np.uint8)
        cv2.rectangle(outline, (x, y), (x + w, y + h), 1, thickness=2 * max(2, margin // 4))
        clear &= ~outline.astype(bool)
        label_width = int(np.ceil(220 / canvas_per_sent))
        clear[max(0, y - margin) : y + margin, max(0, x - margin) : x + label_width] = False
    assert clear.any(), "no pixel of this mask is clear of the others"
    depth = cv2.distanceTransform(clear.astype(np.uint8), cv2.DIST_L2, 3)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(x), int(y)


def test_masks_take_the_class_colour_and_hovering_one_shows_its_details(page, live_server, example_images):
    from selenium.webdriver.common.action_chains import ActionChains

    page.open(live_server.url)
    assert page.upload(example_images[1]) == "done"
    sent = page.download("download-sent")
    visible = api_annotations(live_server.url, sent, page.threshold())
    listed = page.listed()
    colors = requests.get(f"{live_server.url}/model", timeout=10).json()["class_colors"]
    canvas = page.driver.execute_script(
        "const c = document.getElementById('canvas'); return [c.width, c.height, c.clientWidth, c.clientHeight];")
    sent_width, _ = image_size(sent)
    canvas_per_sent = canvas[0] / sent_width  # this photo is sent as it is: photo pixels are sent pixels
    chosen = 0
    x, y = _lone_interior_pixel(visible, chosen, canvas_per_sent)
    canvas_x, canvas_y = int((x + 0.5) * canvas_per_sent), int((y + 0.5) * canvas_per_sent)

    # The mask is blended over the photo in the class colour (app.js: alpha 0.45 when nothing is highlighted).
    name = visible[chosen]["category_name"]
    with_mask = page.canvas_pixel(canvas_x, canvas_y)
    page.class_box(name).click()
    photo_pixel = page.canvas_pixel(canvas_x, canvas_y)
    page.class_box(name).click()
    color = np.array([int(colors[name][i : i + 2], 16) for i in (1, 3, 5)])
    assert np.abs(with_mask - (0.55 * photo_pixel + 0.45 * color)).max() <= 3, (with_mask, photo_pixel, color)

    # Hovering the mask there highlights it and shows its details.
    scale = canvas[2] / canvas[0]  # canvas pixels -> CSS pixels
    ActionChains(page.driver).move_to_element_with_offset(
        page.element("#canvas"), round(canvas_x * scale - canvas[2] / 2), round(canvas_y * scale - canvas[3] / 2)
    ).perform()
    page.wait(lambda: page.element("#details").get_attribute("data-for-instance") == str(listed[chosen].index),
              "the details of the instance under the pointer")
    assert page.elements("#instances li.hovered")[0].get_attribute("data-instance") == str(listed[chosen].index)
    ActionChains(page.driver).move_to_element(page.element("header")).perform()
    page.wait(lambda: not page.element("#details").is_displayed(), "the details to close")

    # Clicking an instance in the list keeps it selected, with its details.
    second = page.elements("[data-instance]")[1]
    second.click()
    details = page.element("#details")
    assert details.is_displayed() and details.get_attribute("data-for-instance") == str(listed[1].index)
    assert listed[1].category in details.text and f"{listed[1].score:.5f}" in details.text
    assert not page.element("#neighbours-section").is_displayed()  # no instance index on this server

    page.driver.save_screenshot(str(page.downloads.parent / "web-page.png"))
    if os.environ.get("MASKRCNN_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes(page.driver.get_screenshot_as_png())


def _synthetic_masks() -> list[np.ndarray]:
    """Masks that stress an RLE decoder: empty, full, single corner pixels, runs that wrap from the bottom of one
    column to the top of the next, noise (many runs), and a tall image (counts of several 5-bit chunks, negative
    differences)."""
    rng = np.random.default_rng(0)
    wrap = np.zeros((40, 30), np.uint8)
    wrap[30:, 5] = 1
    wrap[:10, 6] = 1
    corners = np.zeros((40, 30), np.uint8)
    corners[0, 0] = corners[-1, -1] = 1
    tall = np.zeros((3000, 700), np.uint8)
    tall[5:2990, 300:320] = 1
    tall[1000:1001, 10:690] = 1
    return [np.zeros((40, 30), np.uint8), np.ones((40, 30), np.uint8), corners, wrap,
            (rng.random((64, 48)) < 0.5).astype(np.uint8), tall]


def test_the_page_decodes_masks_as_pycocotools_does(page, live_server, example_images):
    """app.js's COCO RLE decoder (decodeMask: a crop of the mask and its area) against pycocotools, on every
    detection of an example image above 0.05 and on masks made to stress it."""
    page.open(live_server.url)
    masks = [mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"]})
             for a in api_annotations(live_server.url, example_images[1].read_bytes(), PAGE_SCORE_THRESHOLD)]
    masks += _synthetic_masks()
    segmentations = []
    for mask in masks:
        rle = mask_utils.encode(np.asfortranarray(mask))
        segmentations.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    decoded = page.driver.execute_script(
        "return arguments[0].map((s) => { const m = decodeMask(s); return m && {...m, data: Array.from(m.data)}; });",
        segmentations)
    for mask, crop in zip(masks, decoded, strict=True):
        rows, columns = np.nonzero(mask)
        if len(rows) == 0:
            assert crop is None
            continue
        expected = mask[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        assert (crop["x0"], crop["y0"], crop["width"], crop["height"], crop["area"]) == (
            columns.min(), rows.min(), expected.shape[1], expected.shape[0], int(mask.sum()))
        assert np.array_equal(np.array(crop["data"], np.uint8).reshape(expected.shape), expected)


def test_a_similar_instance_is_listed_with_its_thumbnail_by_id_only(page, live_server):
    """The neighbour list's items (the server's search, issue 17, fills them): the thumbnail is asked for by index
    id, and an id that is not a non-negative integer asks for nothing."""
    page.open(live_server.url)
    good, bad = page.driver.execute_script(
        "const item = (id) => neighbourItem({id, image: 'street.jpg', bbox: [1, 2, 3, 4], category_name: 'circle',"
        "                                     score: 0.9, distance: 0.125});"
        "return [item(7).outerHTML, item('../../etc/passwd').outerHTML];")
    assert 'data-neighbour="7"' in good and 'data-distance="0.125"' in good
    assert '<img src="/index/thumbnail/7"' in good and "circle 0.90 in street.jpg, distance 0.125" in good
    assert "<img" not in bad


def test_an_invalid_file_shows_the_error_state(page, live_server, example_images, tmp_path):
    page.open(live_server.url)
    not_an_image = tmp_path / "holiday.jpg"
    not_an_image.write_bytes(b"this is a text file with a .jpg name\n")
    assert page.upload(not_an_image) == "error"
    assert "This file is not an image your browser can read" in page.status()[1]
    assert page.listed() == [] and not page.element("#canvas").is_displayed()
    assert page.upload(example_images[1]) == "done"  # and the page goes on working


def test_server_errors_are_readable_messages(page, tmp_path, demo_model_dir, example_images):
    """A second real server (1 worker), opened while its model loads (503), whose request limit (4 kB) is below
    the photo's size (413)."""
    server = ServerProcess(demo_model_dir, tmp_path / "server.log", workers=1,
                           flags=["--max-request-bytes", "4096"]).start()
    try:
        while True:  # until it listens: the page itself may be served before the model is ready
            try:
                status, _ = ping(server.url)
                break
            except OSError:
                assert server.alive(), server.log()[-2000:]
                time.sleep(0.05)
        assert status == 503, "the model loaded before the page could see it loading"
        page.open(server.url, ready=False)
        page.wait(lambda: "HTTP 503" in page.status()[1], "the page to say the model is loading", timeout=60)
        state, message, _ = page.status()
        assert state == "idle" and "not ready" in message and "Trying again" in message
        page.wait(lambda: page.status()[1].startswith("Ready"), "the model to load", timeout=240)

        assert page.upload(example_images[1]) == "error"
        _, message, _ = page.status()
        assert "Too large for the server (HTTP 413, request_too_large)" in message, message
        assert page.listed() == []
    finally:
        server.stop()


def test_the_page_asks_nothing_of_other_hosts_and_breaks_no_policy(page, live_server, example_images):
    """Over everything this module did in the browser: every network request went to a server the page was opened
    on (or was a data:/blob: URL, or chromium's own chrome:// pages), and the console has no CSP violation and no
    script error."""
    page.open(live_server.url)
    assert page.upload(example_images[0]) == "done"
    page.set_threshold(0.2)
    requested = []
    for entry in page.driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            requested.append(message["params"]["url"])
    allowed = {urlsplit(url).netloc for url in page.origins}
    outside = [url for url in requested if urlsplit(url).scheme not in ("data", "blob", "chrome")
               and (urlsplit(url).scheme not in ("http", "https") or urlsplit(url).netloc not in allowed)]
    assert outside == []
    assert any(url.startswith(f"{live_server.url}/invocations?") for url in requested)
    console = [entry["message"] for entry in page.driver.get_log("browser")]
    # The only errors: the answers the server errors test provoked (503 while loading, 413).
    unexpected = [line for line in console
                  if "Content Security Policy" in line or "Uncaught" in line or "Refused" in line
                  or ("status of" in line and not ("status of 503" in line or "status of 413" in line))]
    assert unexpected == []


def test_clicking_an_instance_lists_its_nearest_indexed_instances(page, indexed_server, example_images):
    """On a server with an index, each instance of a photo comes with its neighbours; clicking it lists them with
    their thumbnails, fetched by id. The photo was indexed, so each instance finds itself first."""
    server, _, _ = indexed_server
    page.open(server.url)
    assert page.upload(example_images[0]) == "done"
    instances = page.elements("[data-instance]")
    assert instances
    instances[0].click()
    page.wait(lambda: len(page.elements("#neighbours [data-neighbour]")) > 0, "the neighbour list")
    items = page.elements("#neighbours [data-neighbour]")
    assert float(items[0].get_attribute("data-distance")) < 1e-3
    page.wait(lambda: page.driver.execute_script(
        "return Array.from(document.querySelectorAll('#neighbours img')).every(i => i.complete && i.naturalWidth > 0)"),
        "the thumbnails")
    sources = page.driver.execute_script(
        "return Array.from(document.querySelectorAll('#neighbours [data-neighbour]')).map("
        "item => [item.dataset.neighbour, item.querySelector('img').getAttribute('src')])")
    assert sources and all(src == f"/index/thumbnail/{neighbour}" for neighbour, src in sources)
