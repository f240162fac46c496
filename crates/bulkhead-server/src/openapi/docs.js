// Renders /openapi.json for a person: operations by tag, their parameters,
// bodies, responses and schemas, and a form to try each one. Everything is
// built with DOM calls (never innerHTML), and every request goes to this
// origin only, as the page's Content-Security-Policy requires.
"use strict";
(function () {
  const METHODS = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
  const main = document.getElementById("main");
  const keyInput = document.getElementById("key");
  const schemeInput = document.getElementById("scheme");
  let doc = null;

  // The key lives in this tab only.
  keyInput.value = sessionStorage.getItem("bulkhead-key") || "";
  schemeInput.value = sessionStorage.getItem("bulkhead-scheme") || "bearer";
  // Enter in the key field would submit the form (a navigation the policy refuses).
  document.getElementById("auth").addEventListener("submit", (event) => event.preventDefault());
  keyInput.addEventListener("input", () => sessionStorage.setItem("bulkhead-key", keyInput.value));
  schemeInput.addEventListener("change", () => sessionStorage.setItem("bulkhead-scheme", schemeInput.value));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // Descriptions use `code` spans and nothing else worth rendering.
  function text(markdown) {
    const out = el("span", { class: "desc" });
    String(markdown || "").split(/(`[^`]*`)/).forEach((part) => {
      if (part.startsWith("`") && part.endsWith("`") && part.length > 1) out.append(el("code", {}, part.slice(1, -1)));
      else out.append(part);
    });
    return out;
  }

  function resolve(node) {
    let seen = 0;
    while (node && node.$ref && seen++ < 32) {
      const parts = node.$ref.replace(/^#\//, "").split("/").map((p) => p.replace(/~1/g, "/").replace(/~0/g, "~"));
      node = parts.reduce((at, part) => (at ? at[part] : undefined), doc);
    }
    return node || {};
  }

  function refName(node) {
    return node && node.$ref ? node.$ref.split("/").pop() : null;
  }

  function typeLabel(schema) {
    if (schema.$ref) return refName(schema);
    if (schema.oneOf || schema.anyOf) return (schema.oneOf || schema.anyOf).map(typeLabel).join(" | ");
    if (schema.allOf) return schema.allOf.map(typeLabel).join(" & ");
    let type = Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type || "any";
    if (type === "array" && schema.items) type = typeLabel(schema.items) + "[]";
    if (schema.format) type += " (" + schema.format + ")";
    if (schema.enum) type += " ∈ " + schema.enum.map((v) => JSON.stringify(v)).join(", ");
    return type;
  }

  function schemaView(schema, depth, seen) {
    seen = seen || new Set();
    const name = refName(schema);
    const box = el("div", { class: "schema" });
    if (name && seen.has(name)) return el("span", { class: "ptype" }, name + " (above)");
    if (name) seen = new Set(seen).add(name);
    const s = resolve(schema);
    if (s.description && depth === 0) box.append(el("div", {}, text(s.description)));
    const variants = s.oneOf || s.anyOf;
    if (variants) {
      variants.filter((v) => resolve(v).type !== "null").forEach((v) => {
        if (resolve(v).properties || resolve(v).items) box.append(schemaView(v, depth + 1, seen));
      });
    }
    if (s.properties) {
      const required = new Set(s.required || []);
      for (const [prop, sub] of Object.entries(s.properties)) {
        const r = resolve(sub);
        const line = el("div", { class: "prop" },
          el("span", { class: "pname" }, prop), " ",
          el("span", { class: "ptype" }, typeLabel(sub)),
          required.has(prop) ? el("span", { class: "req" }, "required") : null,
          r.description || sub.description ? [" — ", text(sub.description || r.description)] : null);
        box.append(line);
        const nested = r.properties || (r.items && resolve(r.items).properties) || (r.oneOf || r.anyOf || []).some((v) => resolve(v).properties || resolve(v).items);
        if (nested && depth < 6) box.append(schemaView(r.items && !r.properties ? r.items : sub, depth + 1, seen));
        const extra = r.additionalProperties;
        if (extra && typeof extra === "object" && resolve(extra).properties && depth < 6) {
          box.append(el("div", { class: "prop" }, el("span", { class: "desc" }, "each value:")), schemaView(extra, depth + 1, seen));
        }
      }
    } else if (s.items && depth === 0) {
      box.append(el("div", {}, el("span", { class: "ptype" }, typeLabel(s))), schemaView(s.items, depth + 1, seen));
    } else if (!variants) {
      box.append(el("span", { class: "ptype" }, typeLabel(s)));
    }
    return box;
  }

  function example(schema, depth) {
    const s = resolve(schema);
    if (s.example !== undefined) return s.example;
    if (s.examples && s.examples.length) return s.examples[0];
    if (s.enum) return s.enum[0];
    const variants = s.oneOf || s.anyOf;
    if (variants) return example(variants.find((v) => resolve(v).type !== "null") || variants[0], depth);
    const type = Array.isArray(s.type) ? s.type.find((t) => t !== "null") : s.type;
    if (depth > 5) return null;
    if (type === "object" || s.properties) {
      const out = {};
      for (const [prop, sub] of Object.entries(s.properties || {})) {
        if ((s.required || []).includes(prop) || depth === 0) out[prop] = example(sub, depth + 1);
      }
      return out;
    }
    if (type === "array") return [example(s.items || {}, depth + 1)];
    if (type === "integer" || type === "number") return 0;
    if (type === "boolean") return false;
    if (type === "string") return s.format === "uuid" ? null : "";
    return null;
  }

  function isOpen(op) {
    const security = op.security || doc.security || [];
    return security.length === 0 || security.some((r) => Object.keys(r).length === 0);
  }

  function operationView(path, method, op) {
    const params = (op.parameters || []).map(resolve);
    const body = op.requestBody ? resolve(op.requestBody) : null;
    const details = el("details", { class: "op", id: op.operationId || method + path },
      el("summary", {},
        el("span", { class: "method m-" + method }, method),
        el("span", { class: "path" }, path),
        el("span", { class: "sum" }, op.summary || ""),
        el("span", { class: "lock" }, isOpen(op) ? "open" : "needs a key")));
    const inner = el("div", { class: "body" });
    if (op.description) inner.append(el("p", {}, text(op.description)));

    if (params.length) {
      inner.append(el("h3", {}, "Parameters"), el("table", {},
        el("tr", {}, el("th", {}, "name"), el("th", {}, "in"), el("th", {}, "type"), el("th", {}, "")),
        params.map((p) => el("tr", {},
          el("td", { class: "mono" }, p.name, p.required ? el("span", { class: "req" }, "required") : null),
          el("td", {}, p.in),
          el("td", { class: "ptype" }, typeLabel(p.schema || {})),
          el("td", {}, text(p.description || resolve(p.schema || {}).description))))));
    }
    if (body) {
      inner.append(el("h3", {}, "Request body"));
      if (body.description) inner.append(el("p", {}, text(body.description)));
      for (const [type, media] of Object.entries(body.content || {})) {
        inner.append(el("div", { class: "mono" }, type), schemaView(media.schema || {}, 0));
      }
    }

    inner.append(el("h3", {}, "Responses"));
    const rows = Object.entries(op.responses || {}).map(([status, response]) => {
      const r = resolve(response);
      const cell = el("td", {}, text(r.description));
      for (const [type, media] of Object.entries(r.content || {})) {
        cell.append(el("div", { class: "mono" }, type + (media.schema ? ": " + typeLabel(media.schema) : "")));
      }
      const headers = Object.keys(r.headers || {});
      if (headers.length) cell.append(el("div", { class: "desc" }, "headers: ", headers.map((h) => el("code", {}, h))));
      return el("tr", {}, el("td", { class: "status s" + status[0] }, status), cell);
    });
    inner.append(el("table", {}, rows));
    inner.append(tryView(path, method, op, params, body));
    details.append(inner);
    return details;
  }

  function tryView(path, method, op, params, body) {
    const box = el("div", { class: "try" }, el("h3", {}, "Try it"));
    const inputs = {};
    for (const p of params) {
      inputs[p.name] = el("input", { type: "text", name: p.name, placeholder: typeLabel(p.schema || {}) });
      box.append(el("label", {}, el("span", { class: "mono" }, p.name + " (" + p.in + ") "), inputs[p.name]));
    }
    let bodyInput = null;
    if (body && body.content && body.content["application/json"]) {
      const sample = example(body.content["application/json"].schema || {}, 0);
      bodyInput = el("textarea", { spellcheck: "false" }, JSON.stringify(sample, null, 2));
      box.append(el("label", {}, "Body (application/json)"), bodyInput);
    }
    const output = el("div", {});
    const send = el("button", { type: "button" }, "Send");
    send.addEventListener("click", async () => {
      let url = path;
      const query = new URLSearchParams();
      const headers = {};
      for (const p of params) {
        const value = inputs[p.name].value;
        if (p.in === "path") url = url.replace("{" + p.name + "}", encodeURIComponent(value));
        else if (p.in === "query" && value !== "") query.append(p.name, value);
        else if (p.in === "header" && value !== "") headers[p.name] = value;
      }
      const key = keyInput.value.trim();
      if (key && !isOpen(op)) {
        if (schemeInput.value === "api_key") headers["x-api-key"] = key;
        else headers["Authorization"] = "Bearer " + key;
      }
      const init = { method: method.toUpperCase(), headers };
      if (bodyInput) {
        headers["Content-Type"] = "application/json";
        init.body = bodyInput.value;
      }
      const target = url.replace(/^\//, "") + (query.toString() ? "?" + query : "");
      output.replaceChildren(el("p", { class: "desc" }, init.method + " /" + target + " …"));
      try {
        // Relative to this page, so a prefix in front of the server still works.
        const response = await fetch(new URL(target, new URL(".", location.href)), init);
        const head = el("p", {}, el("span", { class: "status s" + String(response.status)[0] }, response.status + " " + response.statusText),
          " ", el("span", { class: "mono desc" }, response.headers.get("content-type") || ""));
        const pre = el("pre", {});
        output.replaceChildren(head, pre);
        const reader = response.body ? response.body.getReader() : null;
        const decoder = new TextDecoder();
        let all = "";
        while (reader) {
          const { done, value } = await reader.read();
          if (done) break;
          all += decoder.decode(value, { stream: true });
          pre.textContent = all;
        }
        try { pre.textContent = JSON.stringify(JSON.parse(all), null, 2); } catch (_) { pre.textContent = all; }
      } catch (error) {
        output.replaceChildren(el("p", { class: "error" }, String(error)));
      }
    });
    box.append(send, output);
    return box;
  }

  function render() {
    document.getElementById("title").textContent = (doc.info && doc.info.title || "API") + " " + (doc.info && doc.info.version || "");
    document.getElementById("summary").replaceChildren(text(doc.info && doc.info.description), " — OpenAPI " + doc.openapi);
    document.title = (doc.info && doc.info.title || "API") + " — API";
    const tags = (doc.tags || []).map((t) => t.name);
    const byTag = new Map(tags.map((t) => [t, []]));
    for (const [path, item] of Object.entries(doc.paths || {})) {
      for (const method of METHODS) {
        const op = item[method];
        if (!op) continue;
        const tag = (op.tags && op.tags[0]) || "other";
        if (!byTag.has(tag)) byTag.set(tag, []);
        byTag.get(tag).push(operationView(path, method, op));
      }
    }
    const sections = [];
    for (const [tag, ops] of byTag) {
      if (!ops.length) continue;
      const info = (doc.tags || []).find((t) => t.name === tag);
      sections.push(el("section", { id: "tag-" + tag }, el("h2", {}, tag), info && info.description ? el("p", {}, text(info.description)) : null, ops));
    }
    const schemas = Object.entries((doc.components && doc.components.schemas) || {});
    if (schemas.length) {
      sections.push(el("section", { id: "schemas" }, el("h2", {}, "Schemas"),
        schemas.map(([name]) => el("details", { class: "op", id: "schema-" + name },
          el("summary", {}, el("span", { class: "path" }, name)),
          el("div", { class: "body" }, schemaView({ $ref: "#/components/schemas/" + name }, 0))))));
    }
    const schemes = Object.entries((doc.components && doc.components.securitySchemes) || {});
    if (schemes.length) {
      sections.unshift(el("section", { id: "auth-schemes" }, el("h2", {}, "Authentication"),
        el("ul", {}, schemes.map(([name, s]) => el("li", {}, el("code", {}, name), ": ", text(s.description || s.type))))));
    }
    main.replaceChildren(...sections);
    if (location.hash) {
      const target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
      if (target && target.tagName === "DETAILS") target.open = true;
    }
  }

  fetch(new URL("openapi.json", new URL(".", location.href)))
    .then((response) => {
      if (!response.ok) throw new Error("openapi.json answered " + response.status);
      return response.json();
    })
    .then((json) => { doc = json; render(); })
    .catch((error) => { main.replaceChildren(el("p", { class: "error" }, "Could not load openapi.json: " + error)); });
})();
