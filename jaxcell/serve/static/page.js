// The page of `jaxcell serve`: one /predict request per chosen image, the answers drawn as they come.
"use strict";

const results = document.getElementById("results");
const template = document.getElementById("result-template");
const drop = document.getElementById("drop");
const input = document.getElementById("files");

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
}

function percent(p) {
  return (100 * p).toFixed(1) + "%";
}

function showAnswer(item, answer) {
  item.querySelector(".status").hidden = true;
  item.querySelector(".overlay").src = answer.cam;
  item.querySelector(".class").textContent = answer.class;
  const probabilities = answer.calibrated_probabilities || answer.probabilities;
  item.querySelector(".confidence").textContent = percent(probabilities[answer.class]);
  item.querySelector(".class-line").hidden = false;
  const bars = item.querySelector(".bars");
  for (const [name, p] of Object.entries(probabilities)) {
    const row = document.createElement("div");
    row.className = "bar" + (name === answer.class ? " top" : "");
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = percent(p);
    track.appendChild(fill);
    row.append(text("span", name, "name"), track, text("span", percent(p), "value"));
    bars.appendChild(row);
  }
  const notes = [answer.calibrated_probabilities ? "Calibrated probabilities." : "Probabilities not calibrated (no temperature recorded)."];
  if (answer.in_distribution === false) {
    item.classList.add("flagged");
    item.querySelector(".ood-warning").hidden = false;
    notes.push("Out-of-distribution score " + answer.ood_score.toFixed(3) + " is above the threshold.");
  } else if (answer.in_distribution === true) {
    notes.push("Resembles the training images (out-of-distribution score " + answer.ood_score.toFixed(3) + ").");
  } else {
    notes.push("This model has no out-of-distribution check: nothing tells whether the image resembles its training images.");
  }
  item.querySelector(".note").textContent = notes.join(" ");
}

function showError(item, message) {
  item.classList.add("failed");
  item.querySelector(".status").hidden = true;
  const error = item.querySelector(".error");
  error.textContent = "Refused: " + message;
  error.hidden = false;
}

async function predict(file) {
  const item = template.content.firstElementChild.cloneNode(true);
  item.querySelector(".file").textContent = file.name;
  const original = item.querySelector(".original img");
  const url = URL.createObjectURL(file);
  original.onerror = () => { original.removeAttribute("src"); };
  original.src = url;
  results.prepend(item);
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const response = await fetch("/predict", { method: "POST", body: form });
    let body;
    try {
      body = await response.json();
    } catch (e) {
      body = { error: "the server answered " + response.status + " without JSON" };
    }
    if (response.ok) showAnswer(item, body.results[0]);
    else showError(item, body.error || ("HTTP " + response.status));
  } catch (e) {
    showError(item, "the server could not be reached (" + e.message + ")");
  }
}

function handle(files) {
  for (const file of files) predict(file);
}

input.addEventListener("change", () => { handle(input.files); input.value = ""; });
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => handle(e.dataTransfer.files));

function fmt(v) {
  if (v === null || v === undefined || v === "") return "not recorded";
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en") : v.toFixed(4);
  if (Array.isArray(v)) return "(" + v.map(fmt).join(", ") + ")";
  if (typeof v === "object") return Object.entries(v).map(([k, x]) => k + ": " + fmt(x)).join(", ");
  return String(v);
}

function cardRows(card) {
  const a = card.architecture, t = card.training;
  const rows = [
    ["Architecture", a.name + (Object.keys(a.arguments).length ? " (" + fmt(a.arguments) + ")" : "")],
    ["Parameters", fmt(a.parameters)],
    ["Input size", a.input_size.join(" x ")],
    ["Classes", card.classes.join(", ")],
    ["Training data", fmt(t.data)],
    ["Split", fmt(t.split)],
    ["Split sizes", fmt(t.sizes)],
    ["Validation accuracy", card.validation ? fmt(card.validation.accuracy) + " (epoch " + card.validation.epoch + ")" : "not recorded"],
  ];
  if (card.evaluations.length === 0) {
    rows.push(["Evaluations", "none recorded in the workdir (jaxcell evaluate --out WORKDIR/NAME.json)"]);
  }
  for (const e of card.evaluations) {
    // "the test split of <data>" -> "Test split"; a folder evaluation keeps its own words in the value.
    const split = /^the (\w+) split of /.exec(e.data || "");
    const label = (split ? split[1][0].toUpperCase() + split[1].slice(1) + " split" : "Evaluation") +
      (e.stain_shift ? ", stain-shifted (HED " + e.stain_shift + ")" : ", clean") + (e.tta ? ", TTA" : "");
    rows.push([label, "accuracy " + fmt(e.accuracy) + ", ECE " + fmt(e.ece) +
      (e.ece_calibrated != null ? " (" + fmt(e.ece_calibrated) + " after temperature scaling)" : "") +
      (e.examples ? "; " + e.examples + " images" : "") + (split ? "" : "; " + e.data)]);
  }
  rows.push(["Calibration", card.calibration.note]);
  rows.push(["Out-of-distribution detector", card.detector
    ? card.detector.method + ", threshold " + fmt(card.detector.threshold) + " (flags at most " + percent(card.detector.flag_share_target) + " of validation images)"
    : card.detector_note]);
  rows.push(["Checkpoint", "step " + card.served.checkpoint_step + (card.served.trained ? ", trained " + card.served.trained : "")]);
  rows.push(["Version", "jaxcell " + card.version]);
  return rows;
}

async function loadCard() {
  const body = document.getElementById("card-body");
  try {
    const response = await fetch("/model");
    const card = await response.json();
    if (!response.ok) throw new Error(card.error || response.status);
    document.getElementById("model-name").textContent = card.model;
    document.getElementById("notice").textContent = card.notice;
    const table = document.createElement("table");
    for (const [k, v] of cardRows(card)) {
      const tr = document.createElement("tr");
      tr.append(text("th", k), text("td", v));
      table.appendChild(tr);
    }
    body.replaceChildren(table);
  } catch (e) {
    body.textContent = "The model card could not be read: " + e.message;
  }
}

loadCard();
