/*
 * <gateway-usage>: what the signed-in user has left today and this month, a chart
 * of the last days, and when the limits reset. No dependencies; docs/widget.md.
 *
 *   <script src="https://gw.example.com/widget.js" defer></script>
 *   <gateway-usage lang="vi"></gateway-usage>
 *   <script>document.querySelector("gateway-usage").getToken = async () => myJwt();</script>
 *
 * The token goes in the Authorization header only, never in a URL (URLs end up in
 * logs and Referer headers). The gateway is the one this script was loaded from,
 * unless the `base` attribute names another.
 */
(() => {
  "use strict";

  // Only readable while the script first runs (null in modules and later callbacks).
  const SCRIPT = document.currentScript && document.currentScript.src;
  const SVG = "http://www.w3.org/2000/svg";

  const STRINGS = {
    en: {
      title: "Your usage",
      plan: "Plan: {plan}",
      today: "Today",
      month: "This month",
      queries: "Questions",
      tokens: "Tokens",
      web: "Web searches",
      left: "{left} of {limit} left",
      unlimited: "Unlimited ({used} used)",
      resetsDay: "Resets {time}",
      resetsMonth: "Resets on {date}",
      chartTokens: "Tokens per day, last {days} days",
      chartQueries: "Questions per day, last {days} days",
      summary: "{total} in total; most on {day}: {max}.",
      summaryEmpty: "Nothing used yet.",
      table: "Show as a table",
      day: "Day",
      loading: "Loading your usage…",
      signIn: "Sign in to see your usage.",
      e401: "Your session has expired or your token is not valid. Sign in again.",
      e429: "Too many requests. Try again in {seconds} seconds.",
      e429Later: "Too many requests. Try again later.",
      eNetwork: "Cannot reach the usage service. Check your connection and try again.",
      eOther: "Your usage could not be loaded (error {status}).",
      retry: "Try again",
    },
    vi: {
      title: "Mức sử dụng của bạn",
      plan: "Gói: {plan}",
      today: "Hôm nay",
      month: "Tháng này",
      queries: "Câu hỏi",
      tokens: "Token",
      web: "Tìm kiếm web",
      left: "Còn {left} / {limit}",
      unlimited: "Không giới hạn (đã dùng {used})",
      resetsDay: "Đặt lại {time}",
      resetsMonth: "Đặt lại ngày {date}",
      chartTokens: "Token mỗi ngày, {days} ngày qua",
      chartQueries: "Câu hỏi mỗi ngày, {days} ngày qua",
      summary: "Tổng {total}; nhiều nhất ngày {day}: {max}.",
      summaryEmpty: "Chưa sử dụng.",
      table: "Xem dạng bảng",
      day: "Ngày",
      loading: "Đang tải mức sử dụng…",
      signIn: "Đăng nhập để xem mức sử dụng.",
      e401: "Phiên đăng nhập đã hết hạn hoặc mã truy cập không hợp lệ. Vui lòng đăng nhập lại.",
      e429: "Quá nhiều yêu cầu. Vui lòng thử lại sau {seconds} giây.",
      e429Later: "Quá nhiều yêu cầu. Vui lòng thử lại sau.",
      eNetwork: "Không kết nối được dịch vụ. Kiểm tra kết nối mạng rồi thử lại.",
      eOther: "Không tải được mức sử dụng (lỗi {status}).",
      retry: "Thử lại",
    },
  };

  const STYLE = `
    :host { display: block; font-family: var(--gateway-usage-font, inherit);
      color: var(--gateway-usage-color, inherit); }
    :host([hidden]) { display: none; }
    .box { background: var(--gateway-usage-background, transparent);
      border: var(--gateway-usage-border, 1px solid #d0d7de);
      border-radius: var(--gateway-usage-radius, 8px);
      padding: var(--gateway-usage-padding, 16px); }
    h2 { font-size: 1.05em; margin: 0; }
    h3 { font-size: .95em; margin: 0 0 .4em; }
    .head { display: flex; flex-wrap: wrap; justify-content: space-between; gap: .25em 1em;
      align-items: baseline; margin-bottom: .75em; }
    .muted { color: var(--gateway-usage-muted, #57606a); font-size: .875em; }
    .periods { display: grid; gap: 1em; grid-template-columns: repeat(auto-fit, minmax(12em, 1fr)); }
    dl { margin: 0; }
    .limit { margin-bottom: .6em; }
    dt { font-size: .875em; color: var(--gateway-usage-muted, #57606a); }
    dd { margin: 0; }
    .bar { height: 6px; border-radius: 3px; overflow: hidden; margin-top: .2em;
      background: var(--gateway-usage-track, #e5e7eb); }
    .bar span { display: block; height: 100%; background: var(--gateway-usage-accent, #2563eb); }
    .bar.warning span { background: var(--gateway-usage-warning, #b45309); }
    .bar.danger span { background: var(--gateway-usage-danger, #b91c1c); }
    figure { margin: 1em 0 0; }
    figcaption { font-size: .875em; font-weight: 600; margin-bottom: .3em; }
    svg { display: block; width: 100%; height: var(--gateway-usage-chart-height, 96px); }
    rect { fill: var(--gateway-usage-accent, #2563eb); }
    rect.today { fill: var(--gateway-usage-accent-today, #1e3a8a); }
    rect.zero { fill: var(--gateway-usage-track, #e5e7eb); }
    .axis { display: flex; justify-content: space-between; }
    details { margin-top: .4em; }
    summary { cursor: pointer; font-size: .875em; }
    table { border-collapse: collapse; font-size: .875em; margin-top: .3em; }
    th, td { padding: .15em .75em .15em 0; text-align: right; }
    th:first-child, td:first-child { text-align: left; }
    [role=alert] { color: var(--gateway-usage-danger, #b91c1c); margin: 0 0 .5em; }
    button { font: inherit; }
  `;

  function language(tag) {
    const primary = String(tag || "").toLowerCase().split(/[-_]/)[0];
    return Object.prototype.hasOwnProperty.call(STRINGS, primary) ? primary : "en";
  }

  // An element with attributes and children (strings become text: nothing from the
  // network is ever parsed as HTML).
  function h(tag, attrs, ...children) {
    const svg = tag === "svg" || tag === "rect" || tag === "title" || tag === "desc";
    const el = svg ? document.createElementNS(SVG, tag) : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) el.setAttribute(name, value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) el.append(child);
    }
    return el;
  }

  // "{left} of {limit} left" with each placeholder replaced by a string or a node.
  function fill(template, values) {
    return template.split(/(\{\w+\})/).filter(Boolean).map((part) => {
      const key = part.match(/^\{(\w+)\}$/);
      return key && key[1] in values ? values[key[1]] : part;
    });
  }

  function text(template, values) {
    return fill(template, values).join("");
  }

  class GatewayUsage extends HTMLElement {
    static get observedAttributes() {
      return ["lang", "token", "base", "days", "metric"];
    }

    constructor() {
      super();
      this.attachShadow({ mode: "open" });
      this._token = null;
      this._getToken = null;
      this._run = 0;
      this._queued = false;
      this.state = "idle"; // loading | ready | error | signed-out
    }

    /** The bearer token (a gateway key or JWT), if the page sets it directly. */
    get token() { return this._token; }
    set token(value) { this._token = value; this._schedule(); }

    /** A function returning the token (or a promise of it): called on every load,
     * and once more after a 401, so a page can hand out a refreshed JWT. */
    get getToken() { return this._getToken; }
    set getToken(fn) { this._getToken = fn; this._schedule(); }

    connectedCallback() {
      // A page may set a property before this script defines the element (a
      // deferred script): that own property would hide the setter, so pass it on.
      for (const name of ["token", "getToken"]) {
        if (Object.prototype.hasOwnProperty.call(this, name)) {
          const value = this[name];
          delete this[name];
          this[name] = value;
        }
      }
      this._schedule();
    }

    attributeChangedCallback() { this._schedule(); }

    // Several changes in one task (lang, then token) load once.
    _schedule() {
      if (this._queued || !this.isConnected) return;
      this._queued = true;
      queueMicrotask(() => { this._queued = false; this.refresh(); });
    }

    get _lang() {
      const el = this.closest("[lang]");
      return (el && el.getAttribute("lang")) || document.documentElement.lang || navigator.language;
    }

    get _strings() { return STRINGS[language(this._lang)]; }

    get _locale() {
      // Intl gets the page's own tag when the widget speaks that language.
      const tag = this._lang;
      return language(tag) === String(tag).toLowerCase().split(/[-_]/)[0] ? tag : "en";
    }

    get _base() {
      const given = this.getAttribute("base");
      if (given) return new URL(given.endsWith("/") ? given : given + "/", location.href);
      return new URL(".", SCRIPT || location.href);
    }

    get _days() {
      const days = parseInt(this.getAttribute("days") || "30", 10);
      return Math.min(Math.max(Number.isFinite(days) ? days : 30, 1), 366);
    }

    async _tokenValue(fresh) {
      if (this._getToken) return await this._getToken({ refresh: fresh });
      return this._token || this.getAttribute("token");
    }

    async _get(path, token) {
      return fetch(new URL(path, this._base), {
        headers: { Authorization: "Bearer " + token, Accept: "application/json" },
        credentials: "omit",
        cache: "no-store",
      });
    }

    /** Load and show the usage again (call it after an answer ends). */
    async refresh() {
      const run = ++this._run;
      const s = this._strings;
      if (this.state !== "ready") this._show("loading", h("p", { role: "status" }, s.loading));
      this.setAttribute("aria-busy", "true");
      try {
        let token = await this._tokenValue(false);
        if (!token) return this._fail(run, "signed-out", s.signIn);
        let usage = await this._get("v1/usage", token);
        if (usage.status === 401 && this._getToken) {
          token = await this._tokenValue(true);
          if (token) usage = await this._get("v1/usage", token);
        }
        const daily = usage.ok ? await this._get(`v1/usage/daily?days=${this._days}`, token) : usage;
        for (const response of [usage, daily]) {
          if (!response.ok) return this._fail(run, "error", this._message(response), response.status);
        }
        const data = { usage: await usage.json(), daily: await daily.json() };
        if (run !== this._run) return;
        this.data = data;
        const subtitle = h("span", { class: "muted" }, text(this._strings.plan, { plan: data.usage.plan }));
        this._show("ready", this._render(data), subtitle);
        this.dispatchEvent(new CustomEvent("gateway-usage-load", { detail: data }));
      } catch (error) {
        // fetch rejects with a TypeError for network failures and CORS refusals alike.
        this._fail(run, "error", s.eNetwork, 0);
      } finally {
        if (run === this._run) this.removeAttribute("aria-busy");
      }
    }

    _message(response) {
      const s = this._strings;
      if (response.status === 401) return s.e401;
      if (response.status === 429) {
        const seconds = parseInt(response.headers.get("Retry-After") || "", 10);
        return Number.isFinite(seconds)
          ? text(s.e429, { seconds: new Intl.NumberFormat(this._locale).format(seconds) })
          : s.e429Later;
      }
      return text(s.eOther, { status: String(response.status) });
    }

    _fail(run, state, message, status) {
      if (run !== this._run) return;
      const s = this._strings;
      const retry = h("button", { type: "button", part: "retry" }, s.retry);
      retry.addEventListener("click", () => this.refresh());
      this._show(state, [h("p", { role: "alert" }, message), state === "error" ? retry : null]);
      this.dispatchEvent(new CustomEvent("gateway-usage-error", { detail: { status, message } }));
    }

    _show(state, content, subtitle) {
      this.state = state;
      this.setAttribute("state", state);
      const s = this._strings;
      const box = h("section", { class: "box", part: "box", "aria-labelledby": "title" },
        h("div", { class: "head" }, h("h2", { id: "title" }, s.title), subtitle), content);
      this.shadowRoot.replaceChildren(h("style", {}, STYLE), box);
    }

    _render({ usage, daily }) {
      const s = this._strings;
      const number = new Intl.NumberFormat(this._locale);
      const limits = usage.limits || {};
      const limit = (name, label) => {
        const entry = limits[name];
        if (!entry) return null;
        const used = entry.used || 0;
        if (entry.limit === null || entry.limit === undefined) {
          return h("div", { class: "limit", "data-limit": name }, h("dt", {}, label),
            h("dd", {}, text(s.unlimited, { used: number.format(used) })));
        }
        const share = entry.limit > 0 ? Math.min(used / entry.limit, 1) : 1;
        const level = share >= 1 ? "danger" : share >= 0.8 ? "warning" : "";
        return h("div", { class: "limit", "data-limit": name }, h("dt", {}, label),
          h("dd", {}, fill(s.left, {
            left: h("strong", {}, number.format(entry.remaining)),
            limit: number.format(entry.limit),
          })),
          h("div", { class: `bar ${level}`, "aria-hidden": "true", part: "bar" },
            h("span", { style: `width: ${(share * 100).toFixed(1)}%` })));
      };
      const webLimited = limits.web_searches_per_day && limits.web_searches_per_day.limit !== null;
      const today = h("section", { part: "today" }, h("h3", {}, s.today),
        h("dl", {}, limit("queries_per_day", s.queries), limit("tokens_per_day", s.tokens),
          webLimited ? limit("web_searches_per_day", s.web) : null),
        this._reset(limits.queries_per_day, s.resetsDay, false));
      const month = h("section", { part: "month" }, h("h3", {}, s.month),
        h("dl", {}, limit("tokens_per_month", s.tokens)),
        this._reset(limits.tokens_per_month, s.resetsMonth, true));
      return [h("div", { class: "periods" }, today, month), this._chart(daily.data || [], number)];
    }

    _reset(entry, template, long) {
      if (!entry || !entry.resets_at) return null;
      const at = new Date(entry.resets_at);
      const options = long
        ? { day: "numeric", month: "long" }
        : { weekday: "short", hour: "2-digit", minute: "2-digit" };
      const shown = new Intl.DateTimeFormat(this._locale, options).format(at);
      const stamp = h("time", { datetime: entry.resets_at }, shown);
      let relative = null;
      const hours = (at.getTime() - Date.now()) / 3600e3;
      if (!long && hours > 0) {
        // "in 11 hours": what a user wants to know, whatever their time zone.
        const rtf = new Intl.RelativeTimeFormat(this._locale, { numeric: "auto" });
        relative = " (" + (hours >= 1
          ? rtf.format(Math.floor(hours), "hour")
          : rtf.format(Math.max(1, Math.ceil(hours * 60)), "minute")) + ")";
      }
      return h("p", { class: "muted" }, fill(template, { time: stamp, date: stamp }), relative);
    }

    _chart(rows, number) {
      const s = this._strings;
      const queries = this.getAttribute("metric") === "queries";
      const value = (row) => (queries ? row.queries : row.total_tokens) || 0;
      const day = new Intl.DateTimeFormat(this._locale, { day: "numeric", month: "short", timeZone: "UTC" });
      const label = (row) => day.format(new Date(row.day + "T00:00:00Z"));
      const max = Math.max(0, ...rows.map(value));
      const total = rows.reduce((sum, row) => sum + value(row), 0);
      const peak = rows.find((row) => value(row) === max);
      const caption = text(queries ? s.chartQueries : s.chartTokens, { days: rows.length });
      const summary = max > 0
        ? text(s.summary, { total: number.format(total), max: number.format(max), day: label(peak) })
        : s.summaryEmpty;
      const width = 10;
      const bars = rows.map((row, i) => {
        const v = value(row);
        const height = max > 0 ? Math.max((v / max) * 100, v > 0 ? 2 : 0) : 0;
        const cls = [i === rows.length - 1 ? "today" : "", v ? "" : "zero"].join(" ").trim();
        return h("rect", {
          class: cls || null, x: i * width + 1, width: width - 2,
          y: 100 - Math.max(height, 1), height: Math.max(height, 1), "data-day": row.day,
          "data-value": v,
        }, h("title", {}, `${label(row)}: ${number.format(v)}`));
      });
      const svg = h("svg", {
        viewBox: `0 0 ${rows.length * width} 100`, preserveAspectRatio: "none",
        role: "img", "aria-labelledby": "chart-caption chart-summary", part: "chart",
      }, bars);
      const table = h("table", {},
        h("caption", { class: "muted" }, caption),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, s.day),
          h("th", { scope: "col" }, s.queries), h("th", { scope: "col" }, s.tokens))),
        h("tbody", {}, rows.map((row) => h("tr", {}, h("th", { scope: "row" }, label(row)),
          h("td", {}, number.format(row.queries || 0)),
          h("td", {}, number.format(row.total_tokens || 0))))));
      return h("figure", {},
        h("figcaption", { id: "chart-caption" }, caption),
        svg,
        rows.length ? h("div", { class: "axis muted", "aria-hidden": "true" },
          h("span", {}, label(rows[0])), h("span", {}, label(rows[rows.length - 1]))) : null,
        h("p", { class: "muted", id: "chart-summary" }, summary),
        h("details", {}, h("summary", {}, s.table), table));
    }
  }

  if (!customElements.get("gateway-usage")) customElements.define("gateway-usage", GatewayUsage);
})();
