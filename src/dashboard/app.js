// The shardmq dashboard: plain JavaScript over the admin API, no framework, no build step.
//
// Every string that comes from the API (client ids, topics, usernames, errors) is hostile: the
// DOM is built with createElement and textContent only, never by parsing HTML.

import { RateChart, formatRate } from './chart.js';

const TOKEN_KEY = 'shardmq.admin_token';
const POLL_MS = 2000;
const REQUEST_TIMEOUT_MS = 10000;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------
// DOM helpers

/** An element with text content (never HTML) and optional class names and attributes. */
function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function cell(text, className) {
  return el('td', text, className);
}

/** Replaces a table's body with `rows`, or one row saying `empty` when there are none. */
function fillTable(table, rows, empty) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
  if (rows.length === 0 && empty) {
    const td = cell(empty, 'empty');
    td.colSpan = table.tHead.rows[0].cells.length;
    const tr = el('tr');
    tr.append(td);
    body.append(tr);
  }
}

function setMessage(id, text, kind) {
  const node = $(id);
  node.textContent = text || '';
  node.className = 'message' + (kind ? ' ' + kind : '');
}

function show(value) {
  if (value === null || value === undefined || value === '') return '—';
  if (typeof value === 'boolean') return value ? 'yes' : 'no';
  return String(value);
}

function number(value) {
  return typeof value === 'number' && Number.isFinite(value) ? value : null;
}

function duration(seconds) {
  const s = number(seconds);
  if (s === null) return '—';
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), r = Math.floor(s % 60);
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  if (m > 0) return `${m}m ${r}s`;
  return `${r}s`;
}

function rate(value) {
  const v = number(value);
  return v === null ? '—' : formatRate(v);
}

function protocol(value) {
  const names = { 3: '3.1', 4: '3.1.1', 5: '5.0' };
  return names[value] || show(value);
}

function since(ms) {
  const v = number(ms);
  if (v === null) return show(ms);
  const date = new Date(v);
  if (Number.isNaN(date.getTime())) return show(ms);
  // Local time, compact and the same in every locale: 2026-12-03 15:47:33.
  const two = (n) => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ` +
    `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
}

/** A button whose first click asks again in place; `action` runs on the second. */
function confirmButton(label, question, action) {
  const holder = el('span', null, 'confirm');
  const ask = el('button', label, 'danger small');
  ask.type = 'button';
  ask.dataset.action = 'ask';
  const reset = () => holder.replaceChildren(ask);
  ask.addEventListener('click', () => {
    const yes = el('button', 'Yes, ' + label.toLowerCase(), 'danger small');
    yes.type = 'button';
    yes.dataset.action = 'confirm';
    const no = el('button', 'Cancel', 'secondary small');
    no.type = 'button';
    no.dataset.action = 'cancel';
    no.addEventListener('click', reset);
    yes.addEventListener('click', async () => {
      yes.disabled = true;
      no.disabled = true;
      try {
        await action();
      } finally {
        reset();
      }
    });
    holder.replaceChildren(el('span', question), yes, no);
  });
  holder.append(ask);
  return holder;
}

// ---------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, message, json) {
    super(message);
    this.status = status;
    // Whether the answer was the API's own JSON error (a 404 for a missing client, say),
    // rather than the router's empty 404 for a path this node does not have.
    this.json = json;
  }
}

/** Whether `error` says this node does not have the endpoint at all (not landed yet). */
function unavailable(error) {
  return error instanceof ApiError && (error.status === 405 || (error.status === 404 && !error.json));
}

function errorText(error) {
  if (unavailable(error)) return 'Not available on this node (its admin API has no such endpoint).';
  return error instanceof ApiError && error.status ? `${error.status}: ${error.message}` : String(error.message || error);
}

/** Shows `error` in message `id`, as "not available" when the endpoint is missing. */
function showError(id, error) {
  setMessage(id, errorText(error), unavailable(error) ? 'unavailable' : 'error');
}

let token = null;

async function request(method, path, body, given) {
  const headers = { Authorization: 'Bearer ' + (given || token || '') };
  const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
  // Every state change is JSON (the endpoint refuses anything else, a body-less DELETE too).
  if (method !== 'GET') headers['Content-Type'] = 'application/json';
  if (body !== undefined) init.body = JSON.stringify(body);
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  init.signal = controller.signal;
  let response, text;
  try {
    response = await fetch(path, init);
    text = await response.text();
  } catch (e) {
    throw new ApiError(0, e && e.name === 'AbortError'
      ? `no answer within ${REQUEST_TIMEOUT_MS / 1000} s` : 'cannot reach the node');
  } finally {
    clearTimeout(timer);
  }
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const own = data !== null && typeof data === 'object' && typeof data.error === 'string';
    throw new ApiError(response.status, own ? data.error : (text.trim() || response.statusText || 'error'), own);
  }
  return data;
}

/** An API call with the session's token; a 401 ends the session and returns to the login. */
async function api(method, path, body) {
  try {
    return await request(method, path, body);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401 && token !== null) {
      logout('The node refused the token (401): log in again.');
    }
    throw error;
  }
}

function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== '' && value !== null && value !== undefined) search.set(key, value);
  }
  const text = search.toString();
  return text ? '?' + text : '';
}

// ---------------------------------------------------------------------------------------
// Login and session

let pollTimer = null;
let chart = null;
let lastStatus = null;
let lastNodes = null;

async function login(given) {
  setMessage('login-message', 'Checking the token…', 'info');
  $('login-button').disabled = true;
  try {
    await request('GET', '/api/v1/nodes', undefined, given);
  } catch (error) {
    if (!(error instanceof ApiError) || [0, 401, 403, 421].includes(error.status)) {
      sessionStorage.removeItem(TOKEN_KEY);
      const text = error.status === 401 ? 'Wrong token (401): the node refused it.' : errorText(error);
      setMessage('login-message', text, 'error');
      showLogin();
      return;
    }
    // Any other answer got past the token check: the token is good.
  } finally {
    $('login-button').disabled = false;
  }
  token = given;
  sessionStorage.setItem(TOKEN_KEY, given);
  $('token').value = '';
  setMessage('login-message', '');
  $('login').hidden = true;
  $('app').hidden = false;
  chart.clear();
  switchView('overview');
  poll();
}

function showLogin() {
  $('app').hidden = true;
  $('login').hidden = false;
  $('token').focus();
}

function logout(message) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(pollTimer);
  pollTimer = null;
  lastStatus = lastNodes = null;
  // Drop what the session showed.
  for (const table of document.querySelectorAll('#app table')) fillTable(table, []);
  for (const node of document.querySelectorAll('#app .message')) node.textContent = '';
  $('retained-detail').hidden = true;
  chart.clear();
  setMessage('login-message', message || 'Logged out.', message ? 'error' : 'info');
  showLogin();
}

// ---------------------------------------------------------------------------------------
// Views

const loaders = {
  overview: () => {},
  clients: loadClients,
  subscriptions: () => { loadSubscriptions(); loadRoutes(); },
  retained: loadRetained,
  settings: renderSettings,
};

function switchView(name) {
  for (const button of $('tabs').querySelectorAll('button')) {
    button.classList.toggle('active', button.dataset.view === name);
  }
  for (const view of document.querySelectorAll('.view')) {
    view.hidden = view.id !== 'view-' + name;
  }
  if (name === 'overview') chart.draw();
  (loaders[name] || (() => {}))();
}

// Overview -------------------------------------------------------------------------------

async function poll() {
  clearTimeout(pollTimer);
  if (token === null) return;
  const [nodes, status] = await Promise.allSettled([
    api('GET', '/api/v1/nodes'),
    api('GET', '/api/v1/cluster/status'),
  ]);
  if (token === null) return;
  lastNodes = nodes.status === 'fulfilled' ? nodes.value : null;
  lastStatus = status.status === 'fulfilled' ? status.value : null;
  try {
    renderOverview(nodes, status);
    if (!$('view-settings').hidden) renderSettings();
    $('poll-state').textContent = 'updated ' + new Date().toLocaleTimeString();
  } catch (error) {
    // An answer of a shape this page does not know: say so, and keep polling.
    $('poll-state').textContent = 'cannot show the answer: ' + String(error && error.message);
  } finally {
    pollTimer = setTimeout(poll, POLL_MS);
  }
}

function renderOverview(nodes, status) {
  const list = lastNodes && Array.isArray(lastNodes.nodes) ? lastNodes.nodes : [];
  const standalone = list.length === 1 && list[0].role === 'standalone';
  if (nodes.status === 'rejected') {
    showError('nodes-message', nodes.reason);
  } else {
    setMessage('nodes-message', '');
  }
  const st = lastStatus;
  const members = new Map();
  if (st && Array.isArray(st.members)) for (const m of st.members) members.set(m.node, m);
  const followers = new Map();
  if (st && Array.isArray(st.followers)) for (const f of st.followers) followers.set(f.node, f);
  const raft = st && st.raft ? st.raft : null;

  let received = 0, sent = 0;
  const rows = list.map((n) => {
    const tr = el('tr');
    tr.dataset.node = show(n.node);
    const member = members.get(n.node);
    const state = n.state || (member ? member.state : (standalone ? 'self' : null));
    const role = n.role || (member ? member.role : null);
    tr.append(cell(show(n.node)), cell(show(role)), cell(show(state), 'state-' + show(state)));
    if (typeof n.error === 'string') {
      const td = cell(n.error, 'error');
      td.colSpan = 8;
      tr.append(td);
      return tr;
    }
    received += number(n.messages_received_per_second) || 0;
    sent += number(n.messages_sent_per_second) || 0;
    tr.append(
      cell(show(n.version)),
      cell(duration(n.uptime_seconds)),
      cell(show(n.connections), 'num'),
      cell(show(n.sessions_online), 'num'),
      cell(rate(n.messages_received_per_second), 'num'),
      cell(rate(n.messages_sent_per_second), 'num'),
    );
    let raftText = '—';
    if (raft && role === 'core') {
      raftText = raft.leader === n.node ? 'leader' : (Array.isArray(raft.voters) && raft.voters.includes(n.node) ? 'voter' : 'core');
    }
    tr.append(cell(raftText, raftText === 'leader' ? 'state-leader' : ''));
    const f = followers.get(n.node);
    tr.append(cell(f ? `${show(f.behind_entries)} entries, ${show(f.lag_ms)} ms` : '—'));
    return tr;
  });
  fillTable($('nodes-table'), rows, nodes.status === 'fulfilled' ? 'No nodes.' : null);
  if (nodes.status === 'fulfilled') {
    chart.add(Date.now(), received, sent);
    $('rates-now').textContent = `now: ${formatRate(received)} in, ${formatRate(sent)} out msg/s`;
  }

  // The cluster section: only for a clustered node.
  const section = $('cluster-section');
  if (standalone) {
    section.hidden = true;
    return;
  }
  section.hidden = false;
  if (status.status === 'rejected') {
    showError('cluster-message', status.reason);
    return;
  }
  setMessage('cluster-message', '');
  renderCluster(st);
}

function facts(dl, pairs) {
  const items = [];
  for (const [key, value] of pairs) {
    const dt = el('dt', key);
    const dd = el('dd', show(value));
    dd.dataset.fact = key;
    items.push(dt, dd);
  }
  dl.replaceChildren(...items);
}

function renderCluster(st) {
  const pairs = [
    ['This node', `${show(st.node)} (${show(st.role)})`],
    ['Routes known', `${show(st.route_count)} (${show(st.own_route_count)} its own)`],
  ];
  if (st.raft) {
    const r = st.raft;
    pairs.push(['Raft leader', r.leader], ['Raft state', r.state], ['Term', r.term],
      ['Commit', r.commit], ['Applied', r.applied],
      ['Voters', Array.isArray(r.voters) ? r.voters.join(', ') : r.voters]);
    if (r.store_error) pairs.push(['Raft store error', r.store_error]);
  }
  if (st.log) pairs.push(['Route log', `epoch ${show(st.log.epoch)}, ${show(st.log.entries)} entries`]);
  if (st.following) pairs.push(['Follows core', `${show(st.following.core)}, applied ${show(st.following.applied)}`]);
  facts($('cluster-facts'), pairs);

  fillTable($('members-table'), (st.members || []).map((m) => {
    const tr = el('tr');
    tr.dataset.node = show(m.node);
    tr.append(cell(show(m.node)), cell(show(m.role)), cell(show(m.state), 'state-' + show(m.state)),
      cell(show(m.cluster_address)), cell(show(m.mqtt_address)), cell(show(m.route_count), 'num'));
    return tr;
  }), 'No members.');
  fillTable($('followers-table'), (st.followers || []).map((f) => {
    const tr = el('tr');
    tr.append(cell(show(f.node)), cell(show(f.applied), 'num'), cell(show(f.behind_entries), 'num'),
      cell(show(f.lag_ms), 'num'));
    return tr;
  }), 'No followers replicate from this node.');
  fillTable($('seeds-table'), (st.seeds || []).map((s) => {
    const tr = el('tr');
    tr.append(cell(show(s.address)), cell(show(s.state)));
    return tr;
  }), 'No seeds.');
}

// Clients --------------------------------------------------------------------------------

let clientsSeq = 0;

async function loadClients() {
  const seq = ++clientsSeq;
  const path = '/api/v1/clients' + query({
    client_id_prefix: $('clients-prefix').value,
    limit: $('clients-limit').value,
  });
  let data;
  try {
    data = await api('GET', path);
  } catch (error) {
    if (seq !== clientsSeq) return;
    fillTable($('clients-table'), []);
    showError('clients-message', error);
    return;
  }
  if (seq !== clientsSeq) return;
  const clients = data && Array.isArray(data.clients) ? data.clients : [];
  const notes = [];
  if (data && data.truncated) notes.push(`Showing the first ${clients.length}: narrow the search for the rest.`);
  if (data && Array.isArray(data.errors)) {
    for (const e of data.errors) notes.push(`Node ${show(e.node)} did not answer: ${show(e.error)}`);
  }
  setMessage('clients-message', notes.join(' '), data && data.errors && data.errors.length ? 'error' : 'info');
  fillTable($('clients-table'), clients.map(clientRow), 'No client matches.');
}

function clientRow(c) {
  const tr = el('tr');
  tr.dataset.clientId = show(c.client_id);
  tr.append(
    cell(show(c.client_id), 'wrap mono'),
    cell(show(c.node)),
    cell(show(c.username), 'wrap'),
    cell(show(c.address)),
    cell(show(c.listener)),
    cell(protocol(c.protocol)),
    cell(since(c.connected_since_ms)),
    cell(number(c.keep_alive) === null ? show(c.keep_alive) : c.keep_alive + ' s', 'num'),
    cell(show(c.clean_start)),
    cell(number(c.session_expiry) === null ? show(c.session_expiry) : c.session_expiry + ' s', 'num'),
    cell(show(c.subscriptions), 'num'),
    cell(show(c.queued), 'num'),
    cell(show(c.inflight), 'num'),
  );
  const action = el('td');
  action.append(confirmButton('Kick', 'Disconnect this client?', () => kick(c.client_id, tr)));
  tr.append(action);
  return tr;
}

async function kick(clientId, row) {
  try {
    const answer = await api('DELETE', '/api/v1/clients/' + encodeURIComponent(String(clientId)));
    setMessage('clients-message', `Kicked ${clientId} (node ${show(answer && answer.node)}).`, 'ok');
    row.remove();
  } catch (error) {
    if (error instanceof ApiError && error.status === 404 && error.json) {
      setMessage('clients-message', `${clientId} is not connected any more: ${error.message}`, 'error');
      row.remove();
    } else {
      showError('clients-message', error);
    }
  }
}

// Subscriptions and routes ---------------------------------------------------------------

/**
 * Fills table `name`-table from `path`'s array `key`, with `row` making each row, and says
 * in `name`-message when the list was cut short or the call failed.
 */
async function loadList(name, path, key, row, empty) {
  const table = $(name + '-table');
  try {
    const data = await api('GET', path);
    const list = data && Array.isArray(data[key]) ? data[key] : [];
    setMessage(name + '-message', data && data.truncated ? `Showing the first ${list.length}: narrow the search for the rest.` : '', 'info');
    fillTable(table, list.map(row), empty);
  } catch (error) {
    fillTable(table, []);
    showError(name + '-message', error);
  }
}

function loadSubscriptions() {
  const path = '/api/v1/subscriptions' + query({
    client_id_prefix: $('subscriptions-client').value,
    filter_prefix: $('subscriptions-filter').value,
    limit: 500,
  });
  return loadList('subscriptions', path, 'subscriptions', (s) => {
    const tr = el('tr');
    tr.append(cell(show(s.client_id), 'wrap mono'), cell(show(s.node)), cell(show(s.filter), 'wrap mono'),
      cell(show(s.qos), 'num'));
    return tr;
  }, 'No subscription matches.');
}

function loadRoutes() {
  const path = '/api/v1/routes' + query({ filter_prefix: $('routes-filter').value, limit: 500 });
  return loadList('routes', path, 'routes', (r) => {
    const tr = el('tr');
    tr.dataset.filter = show(r.filter);
    tr.append(cell(show(r.filter), 'wrap mono'), cell(Array.isArray(r.nodes) ? r.nodes.map(show).join(', ') : show(r.nodes)));
    return tr;
  }, 'No route matches.');
}

// Retained messages ----------------------------------------------------------------------

let shownTopic = null;

function loadRetained() {
  const path = '/api/v1/retained' + query({ topic_prefix: $('retained-prefix').value, limit: 500 });
  return loadList('retained', path, 'retained', (r) => {
    const tr = el('tr');
    tr.dataset.topic = show(r.topic);
    const view = el('button', 'View', 'secondary small');
    view.type = 'button';
    view.addEventListener('click', () => viewRetained(r.topic));
    const action = el('td');
    action.append(view);
    tr.append(cell(show(r.topic), 'wrap mono'), cell(show(r.qos), 'num'), cell(show(r.bytes), 'num'), action);
    return tr;
  }, 'No retained message matches.');
}

function retainedPath(topic) {
  return '/api/v1/retained/' + encodeURIComponent(String(topic));
}

async function viewRetained(topic) {
  try {
    const m = await api('GET', retainedPath(topic));
    shownTopic = topic;
    facts($('retained-facts'), [['Topic', m.topic], ['QoS', m.qos], ['Bytes', m.bytes],
      ['Payload', typeof m.payload_text === 'string' ? 'UTF-8 text' : 'not UTF-8: shown in base64']]);
    $('retained-payload').textContent = typeof m.payload_text === 'string' ? m.payload_text : show(m.payload_base64);
    $('retained-detail').hidden = false;
  } catch (error) {
    showError('retained-message', error);
  }
}

async function deleteRetained() {
  if (shownTopic === null) return;
  const topic = shownTopic;
  try {
    await api('DELETE', retainedPath(topic));
    $('retained-detail').hidden = true;
    shownTopic = null;
    await loadRetained();
    setMessage('retained-message', `Deleted the retained message of ${topic}.`, 'ok');
  } catch (error) {
    showError('retained-message', error);
  }
}

// Settings -------------------------------------------------------------------------------

let settingsShown = '';

function renderSettings() {
  const nodes = lastNodes && Array.isArray(lastNodes.nodes) ? lastNodes.nodes : [];
  if (nodes.length === 1 && nodes[0].role === 'standalone') {
    setMessage('settings-message', 'Cluster-wide settings exist only on a clustered node.', 'info');
    fillTable($('settings-table'), []);
    settingsShown = '';
    return;
  }
  if (!lastStatus) return;
  const settings = lastStatus.settings && typeof lastStatus.settings === 'object' ? lastStatus.settings : {};
  // Rebuild only when the values changed, so that a value being typed is not wiped.
  const key = JSON.stringify(settings);
  if (key === settingsShown) return;
  settingsShown = key;
  const entries = Object.entries(settings);
  $('settings-keys').replaceChildren(...entries.map(([k]) => { const o = el('option'); o.value = k; return o; }));
  fillTable($('settings-table'), entries.map(([k, v]) => {
    const tr = el('tr');
    tr.dataset.key = k;
    const input = el('input');
    input.value = show(v);
    input.setAttribute('aria-label', 'New value of ' + k);
    const save = el('button', 'Save', 'small');
    save.type = 'button';
    save.addEventListener('click', () => setSetting(k, input.value));
    const inputCell = el('td');
    inputCell.append(input);
    const saveCell = el('td');
    saveCell.append(save);
    tr.append(cell(k, 'mono'), cell(show(v), 'mono'), inputCell, saveCell);
    return tr;
  }), 'No cluster-wide setting has been set: the nodes use their configured values.');
}

async function setSetting(key, value) {
  try {
    const answer = await api('POST', '/api/v1/cluster/settings', { key: String(key), value: String(value) });
    if (answer && answer.committed === false) {
      setMessage('settings-message', `Proposed ${key} = ${value}, not committed yet (no majority of the cores answered in time).`, 'error');
    } else {
      setMessage('settings-message', `Set ${key} = ${value}: committed, and applied on this node.`, 'ok');
    }
    poll();
  } catch (error) {
    showError('settings-message', error);
  }
}

// ---------------------------------------------------------------------------------------
// Wiring

function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

function onSubmit(id, fn) {
  $(id).addEventListener('submit', (event) => { event.preventDefault(); fn(); });
}

function start() {
  chart = new RateChart($('rates-chart'));
  $('endpoint').textContent = location.host;
  onSubmit('login-form', () => {
    const given = $('token').value.trim();
    if (given) login(given);
  });
  $('logout').addEventListener('click', () => logout());
  for (const button of $('tabs').querySelectorAll('button')) {
    button.addEventListener('click', () => switchView(button.dataset.view));
  }
  onSubmit('clients-form', loadClients);
  $('clients-prefix').addEventListener('input', debounce(loadClients, 300));
  $('clients-limit').addEventListener('change', loadClients);
  onSubmit('subscriptions-form', loadSubscriptions);
  onSubmit('routes-form', loadRoutes);
  onSubmit('retained-form', loadRetained);
  $('retained-delete').append(confirmButton('Delete', 'Delete this retained message?', deleteRetained));
  $('retained-close').addEventListener('click', () => { $('retained-detail').hidden = true; shownTopic = null; });
  onSubmit('settings-form', () => setSetting($('settings-key').value.trim(), $('settings-value').value.trim()));

  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    login(saved);
  } else {
    showLogin();
  }
}

start();
