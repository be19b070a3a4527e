"""GET /: a small self-contained web page to try the models: pick an image, see the overlay and the result.

Plain HTML and JavaScript served by the app itself (no CDN, no build step); it calls the /v1 API.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["ui"])

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fieldkube</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; }
  form { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin-bottom: 1rem; }
  #result-text { font-size: 1.25rem; min-height: 1.5rem; }
  #result-text.error { color: #b00020; }
  #result-image { max-width: 100%; border: 1px solid #ccc; display: none; }
  small { color: #666; }
</style>
</head>
<body>
<h1>fieldkube</h1>
<p>Count flowers in a field image or find buildings in an aerial image (JPEG, PNG or TIFF).</p>
<form id="form">
  <label>Image <input id="file" type="file" accept="image/jpeg,image/png,image/tiff" required></label>
  <label>Task
    <select id="task">
      <option value="count">count flowers</option>
      <option value="segment">segment buildings</option>
    </select>
  </label>
  <button id="run" type="submit">Run</button>
</form>
<div id="result-text" role="status"></div>
<p><small id="result-model"></small></p>
<img id="result-image" alt="overlay of the prediction on the image">
<script>
const form = document.getElementById("form");
const text = document.getElementById("result-text");
const modelLine = document.getElementById("result-model");
const img = document.getElementById("result-image");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = document.getElementById("file").files[0];
  if (!file) { return; }
  const task = document.getElementById("task").value;
  const query = task === "count" ? "density=overlay" : "overlay=true&mask=none";
  const body = new FormData();
  body.append("file", file);
  text.className = "";
  text.textContent = "working…";
  img.style.display = "none";
  try {
    const response = await fetch(`/v1/${task}?${query}`, { method: "POST", body });
    const data = await response.json();
    if (!response.ok) {
      text.className = "error";
      text.textContent = `error ${response.status}: ${data.error}`;
      return;
    }
    text.textContent = task === "count"
      ? `${data.count_rounded} flowers (${data.count.toFixed(2)})`
      : `${(100 * data.building_fraction).toFixed(2)} % buildings`;
    modelLine.textContent = `model ${data.model.name} version ${data.model.version}`;
    img.src = data.overlay_png;
    img.style.display = "block";
  } catch (error) {
    text.className = "error";
    text.textContent = `request failed: ${error}`;
  }
});
</script>
</body>
</html>
"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(PAGE)
