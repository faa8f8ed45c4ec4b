// The playground: reads the model card from /v1/models, streams /v1/completions into the page
// (fetch + ReadableStream over server-sent events) and stops a generation with an AbortController.
"use strict";

const $ = (id) => document.getElementById(id);
const SLIDERS = ["temperature", "top-p", "top-k", "length"];
let model = null; // the /v1/models entry
let controller = null; // the running generation's AbortController

function showSlider(id) {
  const value = $(id).value;
  $(`${id}-value`).textContent = id === "top-k" && value === "0" ? "off" : value;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModel() {
  const response = await fetch("/v1/models");
  if (!response.ok) throw new Error(`GET /v1/models answered ${response.status}`);
  model = (await response.json()).data[0];
  const card = model.charlstm;
  $("model-name").textContent = model.id;
  $("card-cell").textContent = card.cell.toUpperCase();
  $("card-layers").textContent = `${card.layers} × ${card.hidden}`;
  $("card-parameters").textContent = card.parameters.toLocaleString("en");
  $("card-corpus").textContent = card.corpus ?? "unknown";
  $("card-bpc").textContent = card.val_bpc === null ? "not evaluated" : `${card.val_bpc.toFixed(3)} bpc`;
  if (card.curves) {
    $("card-curves").src = card.curves;
    $("card-curves-link").hidden = false;
  }
  // The sliders' ranges and starting values are the server's.
  $("length").max = card.limits.max_tokens;
  $("length").value = card.defaults.max_tokens;
  $("top-k").max = card.vocabulary;
  $("temperature").value = card.defaults.temperature;
  $("top-p").value = card.defaults.top_p;
  $("top-k").value = card.defaults.top_k;
  SLIDERS.forEach(showSlider);
}

function requestBody() {
  const body = {
    model: model.id,
    prompt: $("prompt").value,
    max_tokens: Number($("length").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    top_k: Number($("top-k").value),
    stream: true,
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  return body;
}

function running(yes) {
  $("generate").disabled = yes;
  $("stop").disabled = !yes;
}

// Calls onChunk with each JSON chunk of an SSE body; returns when the stream ends.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.startsWith("data: ") ? event.slice(6) : "";
      if (data === "[DONE]") return;
      if (data) onChunk(JSON.parse(data));
    }
  }
}

async function generate() {
  if (!model) return;
  const body = requestBody();
  controller = new AbortController();
  running(true);
  $("echo").textContent = body.prompt;
  const generated = $("generated");
  generated.textContent = "";
  let characters = 0;
  const started = performance.now();
  setStatus("generating…");
  try {
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      setStatus(error.error?.message ?? `the server answered ${response.status}`, true);
      return;
    }
    let finish = null;
    await readEvents(response, (chunk) => {
      const choice = chunk.choices[0];
      if (!choice) return;
      generated.append(choice.text);
      characters += choice.text.length;
      finish = choice.finish_reason ?? finish;
      const seconds = (performance.now() - started) / 1000;
      setStatus(`${characters} characters, ${Math.round(characters / seconds)} chars/s`);
    });
    const seconds = (performance.now() - started) / 1000;
    setStatus(`${characters} characters in ${seconds.toFixed(2)} s (${finish ?? "ended"})`);
  } catch (error) {
    if (error.name === "AbortError") setStatus(`stopped after ${characters} characters`);
    else setStatus(error.message, true);
  } finally {
    controller = null;
    running(false);
  }
}

function stop() {
  if (controller) controller.abort();
}

SLIDERS.forEach((id) => $(id).addEventListener("input", () => showSlider(id)));
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", stop);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
});
loadModel().catch((error) => setStatus(`cannot read the model card: ${error.message}`, true));
