// The tuchka dashboard: one page, hash routes (#/vms/web-0), plain DOM, no framework.
//
// Protocol: the API token comes once in the URL fragment (#token=…, what `tuchka ui` prints),
// is kept in sessionStorage and removed from the address bar; every API call sends it as
// `Authorization: Bearer`. GET /v1/events is read as a stream with fetch() (server-sent
// events): any event re-reads the page shown. Console logs follow GET …/console/log with
// from/wait (a long poll). Refused actions show the API's ApiError (code, message, chain).
// Nothing is written with innerHTML: every value goes through textContent or attributes.
'use strict';
(() => {
  const SVG = 'http://www.w3.org/2000/svg';
  const KEY = 'tuchka.token';
  const $ = (s, r = document) => r.querySelector(s);
  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // Build an element: h('a', {href: '#/', class: 'x'}, 'text', child, [more]).
  function h(tag, attrs, ...kids) {
    const el = tag.startsWith('svg:')
      ? document.createElementNS(SVG, tag.slice(4))
      : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of kids.flat(Infinity)) {
      if (c != null && c !== false) el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }

  // ---- token and API ------------------------------------------------------------------
  let token = null;
  function takeToken() {
    const m = location.hash.match(/[#&]token=([^&]*)/);
    if (m) {
      sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
      history.replaceState(null, '', location.pathname + location.search + '#/overview');
    }
    token = sessionStorage.getItem(KEY);
    $('#logout').hidden = !token;
  }

  class Refused extends Error {
    constructor(status, body) {
      super(body.message);
      this.status = status;
      this.body = body;
    }
  }

  const authHeaders = () => (token ? { Authorization: 'Bearer ' + token } : {});

  async function api(method, path, body, signal) {
    const headers = { Accept: 'application/json', ...authHeaders() };
    const init = { method, headers, signal, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(path, init);
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new Refused(0, { code: 'Unreachable', message: 'the controller did not answer: ' + e.message, chain: [] });
    }
    const text = await r.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!r.ok) {
      const err = data && data.code ? data : { code: 'HTTP' + r.status, message: text || r.statusText, chain: [] };
      if (r.status === 401) loginNeeded(err);
      throw new Refused(r.status, err);
    }
    return data;
  }
  const get = (path, signal) => api('GET', path, undefined, signal);

  // ---- formatting ---------------------------------------------------------------------
  const pct = (x) => Math.round(Math.max(0, Math.min(1, x || 0)) * 100);
  function mib(n) {
    if (n == null) return '–';
    if (n >= 1048576) return (n / 1048576).toFixed(1) + ' TiB';
    if (n >= 1024) return (n / 1024).toFixed(1) + ' GiB';
    return n + ' MiB';
  }
  const bytes = (n) => (n == null ? '–' : n < 1048576 ? Math.round(n / 1024) + ' KiB' : mib(Math.round(n / 1048576)));
  function ago(t) {
    if (!t) return '–';
    const s = Math.round((Date.now() - Date.parse(t)) / 1000);
    if (isNaN(s)) return t;
    if (s < 60) return Math.max(s, 0) + ' s ago';
    if (s < 3600) return Math.round(s / 60) + ' min ago';
    if (s < 86400) return Math.round(s / 3600) + ' h ago';
    return t.slice(0, 10);
  }
  const badge = (state) => h('span', { class: 'badge s-' + state, 'data-state': state }, state);
  const ips = (addrs) => (addrs || []).map((a) => a.ip).join(', ');
  const link = (href, text, attrs) => h('a', { href, ...attrs }, text);

  function bar(label, frac, detail) {
    const p = pct(frac);
    const fill = h('span', { class: 'fill' + (p >= 90 ? ' hot' : p >= 70 ? ' warm' : '') });
    fill.style.width = p + '%'; // CSSOM, allowed by the CSP (no style attributes)
    return h('div', { class: 'meter' },
      h('span', { class: 'meter-label' }, label),
      h('span', { class: 'bar', role: 'meter', 'aria-label': label, 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': p }, fill),
      h('span', { class: 'meter-value' }, p + ' %' + (detail ? ' · ' + detail : '')));
  }

  function progress(op) {
    const frac = op.total ? op.done / op.total : op.state === 'running' ? 0 : 1;
    const fill = h('span', { class: 'fill' + (op.state === 'failed' ? ' hot' : '') });
    fill.style.width = pct(frac) + '%';
    return h('span', { class: 'bar', role: 'progressbar', 'aria-label': op.kind + ' ' + op.target, 'aria-valuemin': 0, 'aria-valuemax': op.total || 1, 'aria-valuenow': op.done }, fill);
  }

  // An ApiError as the API gave it: message, code, cause chain.
  function errorBlock(err, title) {
    return h('div', { class: 'error-block', 'data-error': err.code || '' },
      title ? h('strong', {}, title) : null,
      h('p', { class: 'error-message' }, err.message),
      err.code ? h('p', { class: 'muted' }, h('code', {}, err.code)) : null,
      err.chain && err.chain.length
        ? h('ol', { class: 'chain', 'aria-label': 'cause chain' }, err.chain.map((c) => h('li', {}, c)))
        : null);
  }

  function table(cols, rows, rowAttrs, caption) {
    if (!rows.length) return h('p', { class: 'muted empty' }, 'None.');
    return h('div', { class: 'table-wrap' },
      h('table', {},
        caption ? h('caption', { class: 'sr' }, caption) : null,
        h('thead', {}, h('tr', {}, cols.map(([name, , cls]) => h('th', { scope: 'col', class: cls }, name)))),
        h('tbody', {}, rows.map((r) => h('tr', rowAttrs ? rowAttrs(r) : {},
          cols.map(([, cell, cls]) => h('td', { class: cls }, cell(r))))))));
  }

  const dl = (pairs) => h('dl', { class: 'facts' },
    pairs.filter((p) => p).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v == null || v === '' ? '–' : v)]));

  const section = (title, ...body) => h('section', {}, h('h2', {}, title), body);

  // ---- flash messages -----------------------------------------------------------------
  function flash(kind, title, err, extra) {
    const box = h('div', { id: 'flash-msg', class: 'msg ' + kind, role: kind === 'error' ? 'alert' : 'status', 'data-kind': kind },
      h('div', {}, err ? errorBlock(err, title) : h('strong', {}, title), extra || null),
      h('button', { type: 'button', class: 'quiet', id: 'flash-close', onclick: () => box.remove() }, 'Dismiss'));
    $('#flash').replaceChildren(box);
    if (kind === 'ok') setTimeout(() => box.remove(), 10000);
  }

  const opLink = (op) => (op && op.id ? h('span', {}, ' operation ', link('#/operations/' + enc(op.id), op.id.slice(0, 8))) : null);

  // Run an API action; show its outcome. Returns the answer, or null when refused.
  async function act(what, fn) {
    try {
      const r = await fn();
      const op = r && r.kind ? r : r && r.operation ? r.operation : null;
      flash('ok', what + ': accepted', null, opLink(op));
      scheduleRefresh(100);
      return r || {};
    } catch (e) {
      if (e.name === 'AbortError') return null;
      flash('error', what + ': refused', e.body || { code: 'Error', message: String(e), chain: [] });
      return null;
    }
  }

  // ---- dialog: modal, traps focus, Escape cancels, focus goes back to its opener -------
  const dlg = $('#dialog');
  let dlgDone = null;
  let dlgOpener = null;
  function ask({ title, body = [], ok = 'OK', danger = false }) {
    const a = document.activeElement;
    dlgOpener = a && a.id ? a.id : null;
    $('#dialog-title').textContent = title;
    $('#dialog-body').replaceChildren(...[].concat(body));
    const okb = $('#dialog-ok');
    okb.textContent = ok;
    okb.classList.toggle('danger', danger);
    dlg.dataset.danger = danger ? 'yes' : 'no';
    dlg.showModal();
    ($('#dialog-body').querySelector('select,input:not([type="checkbox"])') || (danger ? $('#dialog-cancel') : okb)).focus();
    return new Promise((resolve) => {
      dlgDone = resolve;
    });
  }
  function closeDialog(result) {
    if (!dlg.open) return;
    dlg.close();
    const done = dlgDone;
    dlgDone = null;
    const back = dlgOpener && document.getElementById(dlgOpener);
    if (back) back.focus();
    if (done) done(result);
  }
  $('#dialog-form').addEventListener('submit', (e) => {
    e.preventDefault();
    closeDialog(new FormData(e.target));
  });
  $('#dialog-cancel').addEventListener('click', () => closeDialog(null));
  dlg.addEventListener('cancel', (e) => {
    e.preventDefault();
    closeDialog(null);
  });
  dlg.addEventListener('keydown', (e) => {
    if (e.key !== 'Tab') return;
    const f = [...dlg.querySelectorAll('button,input,select,textarea,a[href]')].filter((x) => !x.disabled);
    const i = f.indexOf(document.activeElement);
    if (e.shiftKey && i <= 0) {
      e.preventDefault();
      f[f.length - 1].focus();
    } else if (!e.shiftKey && i === f.length - 1) {
      e.preventDefault();
      f[0].focus();
    }
  });
  const p = (text) => h('p', {}, text);

  // ---- actions ------------------------------------------------------------------------
  const ACTIONS = {
    running: ['stop', 'pause', 'reboot', 'migrate'],
    paused: ['resume', 'stop', 'migrate'],
    stopped: ['start', 'migrate'],
    starting: ['stop'],
    stopping: ['stop'],
    pending: [],
    error: ['start', 'stop'],
    unknown: [],
    lost: [],
  };
  const button = (id, text, onclick, cls) => h('button', { type: 'button', id, class: cls, onclick }, text);

  async function vmPower(vm, action) {
    let body;
    if (action === 'stop') {
      const force = h('input', { type: 'checkbox', name: 'force', id: 'stop-force' });
      const ok = await ask({
        title: 'Stop ' + vm.name + '?',
        body: [p('The guest gets an ACPI shutdown (forced after 60 s); it stays defined and can be started again.'),
          h('label', { class: 'check' }, force, ' Power off at once (force)')],
        ok: 'Stop',
        danger: true,
      });
      if (!ok) return;
      body = { force: ok.get('force') === 'on' };
    }
    await act(action + ' ' + vm.name, () => api('POST', '/v1/vms/' + enc(vm.name) + '/' + action, body));
  }

  async function vmMigrate(vm) {
    const hosts = await get('/v1/hosts');
    const sel = h('select', { name: 'to', id: 'migrate-to' },
      h('option', { value: '' }, 'Let the scheduler choose'),
      hosts.filter((x) => x.name !== vm.host).map((x) => h('option', { value: x.name, disabled: x.state !== 'up' }, x.name + ' (' + x.state + ', ' + mib(x.memory_available_mib) + ' free)')));
    const ok = await ask({
      title: 'Migrate ' + vm.name + '?',
      body: [p(vm.state === 'stopped' ? 'The stopped VM\'s disk moves to another host (cold).' : 'The VM keeps running while its memory and disk are copied (live).'),
        h('label', { for: 'migrate-to' }, 'Target host'), sel],
      ok: 'Migrate',
      danger: true,
    });
    if (!ok) return;
    const to = ok.get('to');
    await act('migrate ' + vm.name, () => api('POST', '/v1/vms/' + enc(vm.name) + '/migrate', to ? { to } : {}));
  }

  function vmButtons(vm) {
    return h('span', { class: 'actions' }, (ACTIONS[vm.state] || []).map((a) =>
      button('act-' + a + '-' + vm.name, a, () => (a === 'migrate' ? vmMigrate(vm) : vmPower(vm, a)),
        a === 'stop' || a === 'migrate' ? 'warn' : '')));
  }

  async function groupScale(g) {
    const input = h('input', { type: 'number', name: 'count', id: 'scale-count', min: 0, max: 100, value: g.count, required: true });
    const ok = await ask({ title: 'Scale ' + g.name, body: [h('label', { for: 'scale-count' }, 'Number of VMs (0–100)'), input], ok: 'Scale' });
    if (!ok) return;
    const count = Number(ok.get('count'));
    if (count < g.count) {
      const gone = g.vms.slice().sort((a, b) => b.localeCompare(a, undefined, { numeric: true })).slice(0, g.count - count);
      const sure = await ask({ title: 'Scale ' + g.name + ' down to ' + count + '?', body: [p('This removes ' + gone.join(', ') + ' with their disks.')], ok: 'Remove VMs', danger: true });
      if (!sure) return;
    }
    await act('scale ' + g.name + ' to ' + count, () => api('POST', '/v1/groups/' + enc(g.name) + '/scale', { count }));
  }

  async function hostDrain(host) {
    const ok = await ask({ title: 'Drain ' + host.name + '?', body: [p('No new VMs are placed on it and its ' + host.vms.length + ' VM(s) are migrated to other hosts.')], ok: 'Drain', danger: true });
    if (!ok) return;
    const d = await act('drain ' + host.name, () => api('POST', '/v1/hosts/' + enc(host.name) + '/drain', {}));
    if (d && d.unmovable && d.unmovable.length) {
      flash('warn', 'drain ' + host.name + ': some VMs cannot move', null,
        h('ul', {}, d.unmovable.map((u) => h('li', {}, u.vm + ': ' + u.reason))));
    }
  }

  function hostButtons(x) {
    return h('span', { class: 'actions' },
      x.state === 'draining'
        ? button('act-undrain-' + x.name, 'undrain', () => act('undrain ' + x.name, () => api('POST', '/v1/hosts/' + enc(x.name) + '/undrain')))
        : x.state === 'up' ? button('act-drain-' + x.name, 'drain', () => hostDrain(x), 'warn') : null);
  }

  // ---- charts -------------------------------------------------------------------------
  function chart(hist) {
    const W = 300;
    const H = 64;
    const now = Date.now() / 1000;
    const pts = (hist && hist.points) || [];
    const svg = h('svg:svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', class: 'chart', role: 'img', 'aria-label': 'CPU and memory over the last hour' },
      h('svg:title', {}, 'CPU (line) and memory (dashed) over the last hour'),
      [0.5, 1].map((y) => h('svg:line', { x1: 0, x2: W, y1: H - y * (H - 4), y2: H - y * (H - 4), class: 'grid' })));
    const line = (key, cls) => {
      const d = pts.filter((q) => q.t > now - 3600)
        .map((q) => ((W * (q.t - (now - 3600))) / 3600).toFixed(1) + ',' + (H - Math.min(1, q[key]) * (H - 4)).toFixed(1));
      if (d.length) svg.append(h('svg:polyline', { points: d.join(' '), class: cls }));
    };
    line('memory', 'mem');
    line('cpu', 'cpu');
    return h('figure', { class: 'chart-box' }, svg,
      h('figcaption', { class: 'muted small' }, pts.length
        ? ['last hour: ', h('span', { class: 'key-cpu' }, 'CPU'), ' ', h('span', { class: 'key-mem' }, 'memory')]
        : 'no load samples yet'));
  }

  // ---- views --------------------------------------------------------------------------
  function hostCard(x, hist) {
    return h('article', { class: 'card host', 'data-host': x.name, 'data-state': x.state },
      h('h3', {}, link('#/hosts/' + enc(x.name), x.name), ' ', badge(x.state)),
      h('p', { class: 'muted' }, x.accel + ' · ' + x.cpus + ' CPUs · ' + x.vms.length + ' VMs · load ' + x.load_1m.toFixed(2)),
      bar('CPU', x.cpu_usage),
      bar('Memory', x.memory_mib ? x.memory_in_use_mib / x.memory_mib : 0, mib(x.memory_in_use_mib) + ' of ' + mib(x.memory_mib)),
      bar('Disk', x.disk_mib ? (x.disk_mib - x.disk_free_mib) / x.disk_mib : 0, mib(x.disk_free_mib) + ' free'),
      h('p', { class: 'muted small' }, 'given to VMs: ' + x.cpus_used + ' of ' + x.cpus + ' vCPUs, ' + mib(x.memory_used_mib) + ' memory, ' + mib(x.disk_provisioned_mib) + ' disk'),
      chart(hist));
  }

  const opsTable = (ops) => table([
    ['Operation', (o) => link('#/operations/' + enc(o.id), o.kind, { 'data-op': o.id })],
    ['Target', (o) => o.target],
    ['State', (o) => badge(o.state)],
    ['Progress', (o) => [progress(o), ' ', o.done + '/' + o.total]],
    ['Message', (o) => (o.error ? h('span', { class: 'error-text' }, o.error.message) : o.message), 'opt'],
    ['Started', (o) => ago(o.created_at), 'opt'],
  ], ops, (o) => ({ 'data-op-row': o.id, 'data-state': o.state, 'data-kind': o.kind }), 'operations');

  async function viewOverview(_, ctx) {
    const [hosts, vms, ops, hist] = await Promise.all([
      get('/v1/hosts', ctx.signal), get('/v1/vms', ctx.signal), get('/v1/operations', ctx.signal),
      get('/v1/history', ctx.signal).catch(() => null)]);
    const byHost = Object.fromEntries(((hist && hist.hosts) || []).map((x) => [x.host, x]));
    const counts = {};
    for (const v of vms) counts[v.state] = (counts[v.state] || 0) + 1;
    const running = ops.filter((o) => o.state === 'running');
    return [
      h('h1', {}, 'Overview'),
      section('Hosts', h('div', { class: 'cards' }, hosts.map((x) => hostCard(x, byHost[x.name])))),
      section('VMs by state',
        vms.length
          ? h('ul', { class: 'states' }, Object.keys(counts).sort().map((s) =>
            h('li', {}, link('#/vms?state=' + s, [badge(s), ' ', h('b', { 'data-count': s }, counts[s])]))))
          : h('p', { class: 'muted' }, 'No VMs yet (tuchka group create …).'),
        p(link('#/vms', 'All ' + vms.length + ' VMs'))),
      section('Running operations', running.length ? opsTable(running) : h('p', { class: 'muted' }, 'None running.')),
      section('Latest events', events.length
        ? h('ol', { class: 'events' }, events.slice(0, 10).map((e) => h('li', {}, h('time', { datetime: e.time }, e.time.slice(11, 19)), ' ', h('code', {}, e.kind), ' ', e.message)))
        : h('p', { class: 'muted' }, 'None since the page was opened.')),
    ];
  }

  async function viewHosts(_, ctx) {
    const hosts = await get('/v1/hosts', ctx.signal);
    return [h('h1', {}, 'Hosts'), table([
      ['Name', (x) => link('#/hosts/' + enc(x.name), x.name)],
      ['State', (x) => badge(x.state)],
      ['CPU', (x) => pct(x.cpu_usage) + ' %'],
      ['vCPUs given', (x) => x.cpus_used + '/' + x.cpus, 'opt'],
      ['Memory used', (x) => mib(x.memory_in_use_mib) + ' / ' + mib(x.memory_mib)],
      ['Disk free', (x) => mib(x.disk_free_mib), 'opt'],
      ['VMs', (x) => x.vms.length],
      ['Accel', (x) => x.accel, 'opt'],
      ['Seen', (x) => ago(x.last_seen), 'opt'],
      ['', hostButtons],
    ], hosts, (x) => ({ 'data-host': x.name, 'data-state': x.state }), 'hosts')];
  }

  async function viewHost([name], ctx) {
    const [x, vms, hist] = await Promise.all([get('/v1/hosts/' + enc(name), ctx.signal), get('/v1/vms', ctx.signal), get('/v1/history', ctx.signal).catch(() => null)]);
    const hh = ((hist && hist.hosts) || []).find((q) => q.host === name);
    return [
      h('h1', {}, 'Host ', x.name, ' ', badge(x.state), ' ', hostButtons(x)),
      h('div', { class: 'cards' }, hostCard(x, hh)),
      dl([['Id', x.id], ['Address', x.address || '(single host)'], ['Accelerator', x.accel + ' — ' + x.accel_reason],
        ['Migration channel port', x.channel_port || '–'], ['Cached images', x.cached_images.length], ['Last report', x.last_seen]]),
      section('VMs', vmTable(vms.filter((v) => v.host === name))),
      (x.orphans || []).length ? section('Orphans (left alone)', h('ul', {}, x.orphans.map((o) => h('li', {}, JSON.stringify(o))))) : null,
    ];
  }

  function vmTable(vms) {
    return table([
      ['Name', (v) => link('#/vms/' + enc(v.name), v.name)],
      ['State', (v) => [badge(v.state), v.desired !== v.state && v.state !== 'error' ? h('span', { class: 'muted small' }, ' → ' + v.desired) : null]],
      ['Host', (v) => v.host, 'opt'],
      ['Address', (v) => ips(v.addresses)],
      ['Size', (v) => v.cpus + ' vCPU, ' + mib(v.memory_mib), 'opt'],
      ['CPU', (v) => (v.cpu_usage || 0).toFixed(2), 'opt'],
      ['', vmButtons],
    ], vms, (v) => ({ 'data-vm': v.name, 'data-state': v.state }), 'VMs');
  }

  async function viewVms(_, ctx, query) {
    const vms = await get('/v1/vms', ctx.signal);
    const want = query.get('state');
    const sel = h('select', { id: 'vm-filter', 'aria-label': 'Show VMs in state',
      onchange: (e) => { location.hash = '#/vms' + (e.target.value ? '?state=' + e.target.value : ''); } },
    h('option', { value: '' }, 'all states'),
    Object.keys(ACTIONS).map((s) => h('option', { value: s, selected: s === want }, s)));
    return [h('h1', {}, 'VMs ', sel), vmTable(want ? vms.filter((v) => v.state === want) : vms)];
  }

  function migrationFacts(m) {
    return dl([['From → to', m.from + ' → ' + m.to], ['Mode', m.mode], ['Phase', badge(m.phase)], ['Why', m.reason],
      ['Copied', bytes(m.copied_bytes) + (m.remaining_bytes ? ', ' + bytes(m.remaining_bytes) + ' to go' : '') + (m.mib_per_s ? ', ' + m.mib_per_s.toFixed(0) + ' MiB/s' : '')],
      m.total_ms != null ? ['Took', m.total_ms + ' ms' + (m.downtime_ms != null ? ' (paused ' + m.downtime_ms + ' ms)' : '')] : null,
      m.error ? ['Error', errorBlock(m.error)] : null]);
  }

  async function viewVm([name], ctx) {
    const v = await get('/v1/vms/' + enc(name), ctx.signal);
    return [
      h('h1', { 'data-vm': v.name, 'data-state': v.state }, 'VM ', v.name, ' ', badge(v.state)),
      h('p', { class: 'actions-row' }, vmButtons(v), ' ', link('#/vms/' + enc(v.name) + '/console', 'Console log', { class: 'button', id: 'console-link' })),
      v.error ? errorBlock({ code: '', message: v.error, chain: v.error_chain }, 'Its host reported an error') : null,
      v.pause_reason ? h('p', { class: 'msg warn' }, 'Paused by its host: ' + v.pause_reason) : null,
      dl([['Group', link('#/groups/' + enc(v.group), v.group)], ['Wanted', v.desired], ['Host', link('#/hosts/' + enc(v.host), v.host)],
        ['Why there', v.placement_reason], ['Image', v.image], ['Size', v.cpus + ' vCPU, ' + mib(v.memory_mib) + ' memory, ' + mib(v.disk_mib) + ' disk'],
        v.pending_resize ? ['At next start', v.pending_resize] : null,
        ['Addresses', (v.addresses || []).map((a) => a.network + ' ' + a.ip + ' (' + a.mac + ')').join('; ')],
        ['Volumes', (v.volumes || []).join(', ')], ['Domain', h('code', {}, v.domain)], ['CPU used', (v.cpu_usage || 0).toFixed(2) + ' cores'],
        ['Created', v.created_at], ['Id', v.id]]),
      v.migration ? section('Migration under way', migrationFacts(v.migration)) : null,
      v.last_migration ? section('Last migration', migrationFacts(v.last_migration)) : null,
    ];
  }

  async function viewConsole([name], ctx) {
    ctx.live = false; // its own loop follows it; events do not redraw it
    const pre = h('pre', { id: 'console', class: 'console', 'data-vm': name, tabindex: 0, 'aria-label': 'console log of ' + name, 'aria-live': 'off' });
    const status = h('p', { id: 'console-status', class: 'muted', role: 'status' }, 'reading…');
    const stick = h('input', { type: 'checkbox', id: 'console-follow', checked: true });
    (async () => {
      let from = null;
      while (!ctx.signal.aborted) {
        try {
          const q = from == null ? '' : '?from=' + from + '&wait=25';
          const log = await get('/v1/vms/' + enc(name) + '/console/log' + q, ctx.signal);
          let text = (log.missed ? '\n[… ' + log.missed + ' bytes no longer kept …]\n' : '') + log.text;
          text = text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').replace(/\r/g, '');
          if (text) {
            pre.append(text);
            if (pre.textContent.length > 400000) pre.textContent = pre.textContent.slice(-300000);
            if (stick.checked) pre.scrollTop = pre.scrollHeight;
          }
          from = log.end;
          status.textContent = 'following · ' + bytes(log.end) + ' so far';
          pre.dataset.end = log.end;
        } catch (e) {
          if (ctx.signal.aborted) return;
          status.replaceChildren(errorBlock(e.body || { message: String(e) }, 'cannot read the console log (retrying)'));
          await sleep(3000);
        }
      }
    })();
    return [
      h('h1', {}, 'Console of ', link('#/vms/' + enc(name), name)),
      h('p', {}, h('label', { class: 'check' }, stick, ' Keep the newest line in view'), ' ', status),
      pre,
    ];
  }

  async function viewGroups(_, ctx) {
    const [groups, vms] = await Promise.all([get('/v1/groups', ctx.signal), get('/v1/vms', ctx.signal)]);
    const up = (g) => vms.filter((v) => v.group === g.name && v.state === 'running').length;
    return [h('h1', {}, 'Groups'), table([
      ['Name', (g) => link('#/groups/' + enc(g.name), g.name)],
      ['VMs running', (g) => up(g) + ' of ' + g.count],
      ['Image', (g) => g.image, 'opt'],
      ['Size', (g) => g.cpus + ' vCPU, ' + mib(g.memory_mib) + ', ' + mib(g.disk_mib) + ' disk', 'opt'],
      ['Networks', (g) => g.networks.join(', '), 'opt'],
      ['Placement', (g) => g.placement, 'opt'],
      ['', (g) => button('act-scale-' + g.name, 'scale', () => groupScale(g))],
    ], groups, (g) => ({ 'data-group': g.name, 'data-count': g.count }), 'groups')];
  }

  async function viewGroup([name], ctx) {
    const [g, vms] = await Promise.all([get('/v1/groups/' + enc(name), ctx.signal), get('/v1/vms', ctx.signal)]);
    return [
      h('h1', { 'data-group': g.name }, 'Group ', g.name, ' ', button('act-scale-' + g.name, 'scale', () => groupScale(g))),
      dl([['VMs wanted', g.count], ['Image', g.image], ['Size', g.cpus + ' vCPU, ' + mib(g.memory_mib) + ' memory, ' + mib(g.disk_mib) + ' disk'],
        ['Networks', g.networks.map((n) => link('#/networks/' + enc(n), n + ' '))], ['Placement', g.placement], ['Created', g.created_at]]),
      section('VMs', vmTable(vms.filter((v) => v.group === name))),
    ];
  }

  async function viewNetworks(_, ctx) {
    const nets = await get('/v1/networks', ctx.signal);
    return [h('h1', {}, 'Networks'), table([
      ['Name', (n) => link('#/networks/' + enc(n.name), n.name)],
      ['CIDR', (n) => n.cidr],
      ['State', (n) => [badge(n.state), n.error ? h('span', { class: 'error-text' }, ' ' + n.error) : null]],
      ['Gateway', (n) => n.gateway + (n.gateway_host ? ' on ' + n.gateway_host : ''), 'opt'],
      ['NAT', (n) => (n.nat ? 'yes' : 'no'), 'opt'],
      ['Addresses', (n) => n.addresses.length, 'opt'],
      ['Rules', (n) => n.rules.length],
      ['Forwards', (n) => n.forwards.length],
    ], nets, (n) => ({ 'data-network': n.name, 'data-state': n.state }), 'networks')];
  }

  async function viewNetwork([name], ctx) {
    const n = await get('/v1/networks/' + enc(name), ctx.signal);
    return [
      h('h1', { 'data-network': n.name }, 'Network ', n.name, ' ', badge(n.state)),
      n.error ? errorBlock({ message: n.error, chain: [] }, 'Its gateway host reported an error') : null,
      dl([['CIDR', n.cidr], ['Gateway', n.gateway + (n.gateway_host ? ' on ' + n.gateway_host : '')], ['Bridge', n.bridge + ' (VNI ' + n.vni + ')'], ['Outbound NAT', n.nat ? 'yes' : 'no']]),
      section('Access rules', table([
        ['Direction', (r) => r.direction], ['Action', (r) => r.action], ['What', (r) => h('code', {}, r.spec)],
        ['From / to', (r) => (r.direction === 'in'
          ? 'from ' + (r.from || (r.from_group && 'group ' + r.from_group) || (r.from_network && 'network ' + r.from_network) || '?') + (r.to_group ? ' to group ' + r.to_group : '')
          : 'to ' + (r.to || '0.0.0.0/0'))],
        ['Id', (r) => h('code', {}, r.id), 'opt'],
      ], n.rules, (r) => ({ 'data-rule': r.id }), 'rules')),
      section('Port forwards', table([
        ['Host port', (f) => f.proto + ' ' + f.host_port + (f.host ? ' on ' + f.host : '')], ['To', (f) => f.vm + ' ' + f.vm_ip + ':' + f.vm_port],
        ['Id', (f) => h('code', {}, f.id), 'opt'],
      ], n.forwards, (f) => ({ 'data-forward': f.id }), 'forwards')),
      section('Addresses', table([['VM', (a) => (a.vm ? link('#/vms/' + enc(a.vm), a.vm) : '–')], ['IP', (a) => a.ip], ['MAC', (a) => a.mac, 'opt']], n.addresses, null, 'addresses')),
    ];
  }

  async function viewImages(_, ctx) {
    const imgs = await get('/v1/images', ctx.signal);
    return [h('h1', {}, 'Images'), table([
      ['Name', (i) => i.name], ['From', (i) => i.made_from, 'opt'], ['Virtual size', (i) => bytes(i.virtual_size)],
      ['Stored', (i) => bytes(i.stored_size), 'opt'], ['sha256', (i) => h('code', { title: i.sha256 }, i.sha256.slice(0, 12)), 'opt'],
      ['Used by', (i) => i.used_by.length + ' VMs'], ['Uploaded', (i) => ago(i.created_at), 'opt'],
    ], imgs, (i) => ({ 'data-image': i.name }), 'images')];
  }

  async function viewVolumes(_, ctx) {
    const vols = await get('/v1/volumes', ctx.signal);
    return [h('h1', {}, 'Volumes'), table([
      ['Name', (v) => v.name], ['State', (v) => [badge(v.state), v.error ? h('span', { class: 'error-text' }, ' ' + v.error) : null]],
      ['Host', (v) => v.host], ['VM', (v) => (v.vm ? link('#/vms/' + enc(v.vm), v.vm) : '–')],
      ['Size', (v) => mib(v.size_mib)], ['Allocated', (v) => mib(v.allocated_mib), 'opt'], ['Created', (v) => ago(v.created_at), 'opt'],
    ], vols, (v) => ({ 'data-volume': v.name, 'data-state': v.state }), 'volumes')];
  }

  async function viewOps(_, ctx) {
    return [h('h1', {}, 'Operations'), opsTable(await get('/v1/operations', ctx.signal))];
  }

  async function viewOp([id], ctx) {
    const o = await get('/v1/operations/' + enc(id), ctx.signal);
    return [
      h('h1', { 'data-op': o.id, 'data-state': o.state }, o.kind, ' ', o.target, ' ', badge(o.state)),
      h('p', {}, progress(o), ' ', o.done + ' of ' + o.total + ' · ' + o.message),
      o.error ? errorBlock(o.error, 'Failed') : null,
      dl([['Id', h('code', {}, o.id)], ['Started', o.created_at], ['Ended', o.finished_at],
        o.parent ? ['Part of', link('#/operations/' + enc(o.parent), o.parent.slice(0, 8))] : null]),
      (o.phases || []).length ? section('Phases', table([['Phase', (q) => q.name], ['State', (q) => badge(q.state)], ['What', (q) => q.message],
        ['Started', (q) => (q.started_at || '–').slice(11, 19), 'opt'], ['Ended', (q) => (q.finished_at || '–').slice(11, 19), 'opt']], o.phases, null, 'phases')) : null,
      (o.children || []).length ? section('Made of', h('ul', {}, o.children.map((c) => h('li', {}, link('#/operations/' + enc(c), c.slice(0, 8)))))) : null,
      o.migration ? section('Migration', migrationFacts(o.migration)) : null,
    ];
  }

  let lastPlan = null;
  async function viewBalance(_, ctx) {
    const s = await get('/v1/balance', ctx.signal);
    const plan = async () => {
      try {
        lastPlan = await get('/v1/balance/plan');
        render();
      } catch (e) {
        flash('error', 'balance plan: refused', e.body);
      }
    };
    const apply = async () => {
      const moves = (lastPlan && lastPlan.moves) || [];
      const ok = await ask({ title: 'Apply the balance plan?', danger: true, ok: 'Migrate',
        body: [p(moves.length ? 'These VMs are migrated live:' : 'The controller plans again and migrates what it finds.'), h('ul', {}, moves.map((m) => h('li', {}, m.vm + ': ' + m.from + ' → ' + m.to)))] });
      if (ok) await act('balance apply', () => api('POST', '/v1/balance/apply'));
    };
    const moveCols = [['VM', (m) => m.vm], ['From → to', (m) => m.from + ' → ' + m.to], ['Why', (m) => m.reason, 'opt'],
      ['Imbalance', (m) => m.imbalance_before.toFixed(1) + ' → ' + m.imbalance_after.toFixed(1) + ' %'], ['Cost', (m) => m.cost, 'opt']];
    return [
      h('h1', {}, 'Balance'),
      dl([['Mode', s.mode + (s.mode === 'auto' ? ', every ' + s.interval_s + ' s' : '')], ['Imbalance', s.imbalance.toFixed(1) + ' % (acts above ' + s.threshold + ' %)'],
        ['Rounds above', s.rounds_above + ' of ' + s.hold_rounds]]),
      h('p', { class: 'actions' }, button('act-plan', 'Plan', plan), button('act-apply', 'Apply…', apply, 'warn')),
      lastPlan ? section('Plan', p('Imbalance ' + lastPlan.imbalance.toFixed(1) + ' % → ' + lastPlan.imbalance_after.toFixed(1) + ' %'),
        table(moveCols, lastPlan.moves, (m) => ({ 'data-move': m.vm }), 'moves'),
        lastPlan.why_not.length ? h('ul', { class: 'muted' }, lastPlan.why_not.map((w) => h('li', {}, w))) : null) : null,
      section('Hosts', table([['Host', (x) => x.host], ['CPU', (x) => pct(x.cpu) + ' %'], ['Memory', (x) => pct(x.memory) + ' %'], ['VMs', (x) => x.vms],
        ['Takes VMs', (x) => (x.target ? 'yes' : 'no')]], s.hosts, null, 'loads')),
      section('Latest decisions', table([['When', (d) => ago(d.time)], ['Imbalance', (d) => d.imbalance.toFixed(1) + ' %'], ['Decided', (d) => d.summary],
        ['Operation', (d) => (d.operation ? link('#/operations/' + enc(d.operation), d.operation.slice(0, 8)) : '–')]], s.decisions, null, 'decisions')),
    ];
  }

  // ---- login --------------------------------------------------------------------------
  let loginShown = false;
  function loginNeeded(err) {
    if (loginShown) return;
    loginShown = true;
    if (current) current.ctrl.abort();
    const input = h('input', { type: 'password', id: 'token-input', autocomplete: 'off', required: true, 'aria-describedby': 'token-help' });
    const form = h('form', { class: 'login', onsubmit: (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, input.value.trim());
      loginShown = false;
      takeToken();
      current = null;
      render();
      startLive();
    } },
    h('h1', {}, 'Log in'),
    errorBlock(err),
    h('p', { id: 'token-help' }, 'Open the link ', h('code', {}, 'tuchka ui'), ' prints, or paste the API token (', h('code', {}, '<data-dir>/token'), ').'),
    h('label', { for: 'token-input' }, 'API token'), input, ' ', h('button', { type: 'submit', class: 'primary' }, 'Log in'));
    $('#main').replaceChildren(form);
    input.focus();
  }

  // ---- routing and refresh ------------------------------------------------------------
  const ROUTES = [
    [/^\/(overview)?$/, viewOverview, 'overview'],
    [/^\/hosts$/, viewHosts, 'hosts'], [/^\/hosts\/([^/]+)$/, viewHost, 'hosts'],
    [/^\/groups$/, viewGroups, 'groups'], [/^\/groups\/([^/]+)$/, viewGroup, 'groups'],
    [/^\/vms$/, viewVms, 'vms'], [/^\/vms\/([^/]+)$/, viewVm, 'vms'], [/^\/vms\/([^/]+)\/console$/, viewConsole, 'vms'],
    [/^\/networks$/, viewNetworks, 'networks'], [/^\/networks\/([^/]+)$/, viewNetwork, 'networks'],
    [/^\/images$/, viewImages, 'images'], [/^\/volumes$/, viewVolumes, 'volumes'],
    [/^\/operations$/, viewOps, 'operations'], [/^\/operations\/([^/]+)$/, viewOp, 'operations'],
    [/^\/balance$/, viewBalance, 'balance'],
  ];
  let current = null;
  let seq = 0;
  let firstRender = true;

  async function render() {
    if (loginShown) return;
    const hash = location.hash.replace(/^#/, '') || '/overview';
    const [path, qs] = hash.split('?');
    const same = current && current.hash === hash;
    if (!same) {
      if (current) current.ctrl.abort();
      const ctrl = new AbortController();
      current = { hash, ctrl, signal: ctrl.signal, live: true };
    }
    const me = current;
    const mine = ++seq;
    const route = ROUTES.find(([re]) => re.test(path));
    for (const a of document.querySelectorAll('#nav a')) {
      if (route && a.dataset.nav === route[2]) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    const main = $('#main');
    let node;
    try {
      if (!route) throw new Refused(404, { code: 'NoPage', message: 'no page ' + hash + ' here (see the menu)', chain: [] });
      const params = path.match(route[0]).slice(1).map(decodeURIComponent);
      node = await route[1](params, me, new URLSearchParams(qs || ''));
    } catch (e) {
      if (e.name === 'AbortError' || loginShown) return;
      node = errorBlock(e.body || { code: 'Error', message: String(e), chain: [] }, 'Cannot show this page');
    }
    if (mine !== seq || me !== current || loginShown) return;
    const focused = document.activeElement;
    const focusId = focused && main.contains(focused) ? focused.id : null;
    main.replaceChildren(...[].concat(node).filter((x) => x != null));
    main.dataset.page = route ? route[2] : 'none';
    main.dataset.rendered = String(mine);
    if (!same) {
      const h1 = $('h1', main);
      document.title = (h1 ? h1.textContent + ' · ' : '') + 'tuchka';
      if (!firstRender) main.focus({ preventScroll: true });
      window.scrollTo(0, 0);
    } else if (focusId && document.getElementById(focusId) && !dlg.open) {
      document.getElementById(focusId).focus({ preventScroll: true });
    }
    if (firstRender) {
      firstRender = false;
      performance.mark('tuchka-first-render');
    }
  }

  let refreshTimer = null;
  function scheduleRefresh(ms = 400) {
    if (!current || !current.live || refreshTimer) return;
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      if (current && current.live && !document.hidden) render();
    }, ms);
  }

  // ---- live updates: GET /v1/events as a stream of server-sent events -------------------
  const events = [];
  let liveRunning = false;
  function setLive(on) {
    const el = $('#live');
    el.dataset.live = on ? 'on' : 'off';
    el.textContent = on ? 'live' : 'offline';
  }
  function onSse(chunk) {
    let data = '';
    for (const line of chunk.split('\n')) if (line.startsWith('data:')) data += line.slice(5).replace(/^ /, '');
    if (!data) return; // a keep-alive
    try {
      events.unshift(JSON.parse(data));
      events.length = Math.min(events.length, 50);
    } catch (_) {
      return;
    }
    scheduleRefresh();
  }
  async function startLive() {
    if (liveRunning) return;
    liveRunning = true;
    while (!loginShown) {
      try {
        const r = await fetch('/v1/events', { headers: authHeaders(), cache: 'no-store' });
        if (r.status === 401) break;
        if (!r.ok || !r.body) throw new Error('HTTP ' + r.status);
        setLive(true);
        scheduleRefresh(); // whatever happened while it was away
        const rd = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await rd.read();
          if (done) break;
          buf += value.replace(/\r\n/g, '\n');
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            onSse(buf.slice(0, i));
            buf = buf.slice(i + 2);
          }
        }
      } catch (_) {
        // reconnect below
      }
      setLive(false);
      await sleep(3000);
    }
    liveRunning = false;
  }

  // ---- start --------------------------------------------------------------------------
  $('#logout').addEventListener('click', () => {
    sessionStorage.removeItem(KEY);
    token = null;
    $('#logout').hidden = true;
    loginNeeded({ code: 'LoggedOut', message: 'logged out: the token is forgotten by this tab', chain: [] });
  });
  window.addEventListener('hashchange', () => {
    if (/[#&]token=/.test(location.hash)) {
      takeToken();
      loginShown = false;
      startLive();
    }
    render();
  });
  document.addEventListener('visibilitychange', () => scheduleRefresh(50));
  setInterval(() => scheduleRefresh(0), 20000); // usage figures and charts move without events
  takeToken();
  render();
  startLive();
})();
