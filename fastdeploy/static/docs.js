// The interactive API page: Swagger UI (from the installed swagger-ui-py package) over this
// server's /openapi.json. With API keys, the key is asked for once (or given as /docs#key=KEY),
// kept for this tab only, and sent with the document's request and every "Try it out".
"use strict";

const $ = (id) => document.getElementById(id);
const key = () => sessionStorage.getItem("fastdeploy-key") || "";

function takeKeyFromHash() {
  const match = location.hash.match(/(?:^#|&)key=([^&]*)/);
  if (match) {
    let text = match[1];
    try { text = decodeURIComponent(text); } catch (err) { /* a stray % is part of the key */ }
    sessionStorage.setItem("fastdeploy-key", text);
    window.history.replaceState(null, "", location.pathname + location.search);
  }
}

async function openApi() {
  const headers = key() ? { Authorization: "Bearer " + key() } : {};
  const reply = await fetch("/openapi.json", { headers, cache: "no-store" });
  if (reply.status === 401) {
    $("key-form").hidden = false;
    $("key-error").textContent = key() ? "that key was refused" : "";
    return;
  }
  if (!reply.ok) {
    $("load-error").hidden = false;
    $("load-error").textContent = "could not read /openapi.json: HTTP " + reply.status;
    return;
  }
  $("key-form").hidden = true;
  window.ui = SwaggerUIBundle({
    spec: await reply.json(),
    dom_id: "#swagger-ui",
    deepLinking: true,
    tryItOutEnabled: true,
    validatorUrl: null,
    requestInterceptor: (request) => {
      if (key()) request.headers.Authorization = "Bearer " + key();
      return request;
    },
  });
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("fastdeploy-key", $("key").value.trim());
  openApi();
});
takeKeyFromHash();
openApi();
