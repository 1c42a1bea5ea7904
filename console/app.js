// agentbus console: a single page over the broker's REST API.
//
// Everything a message carries is written into the page with textContent (through `h`),
// never as HTML: content and metadata come from agents and may contain markup or script.
//
// The message log is a window onto the project's history: the latest page first, older
// pages on scrolling up (before_seq), new messages fetched after the cursor (after_seq) the
// moment the project's observer WebSocket reports a commit (polling every second only while
// that socket is down). The window holds at most MAX_ROWS rows, so a project with a long
// history stays as cheap as a short one.
'use strict';

(() => {
  // ---------------------------------------------------------------------------------------
  // Constants

  /** Message types with a colour of their own; any other type gets a grey badge. */
  const KNOWN_TYPES = [
    'status', 'request', 'response', 'discovery', 'coordination', 'task_assignment',
    'status_update', 'escalation', 'result_report', 'error_report', 'heartbeat',
    'capability_query', 'capability_response',
  ];
  const PRIORITY_NAMES = ['critical', 'high', 'normal', 'low'];
  const NORMAL_PRIORITY = 2;
  const OPERATOR = 'operator';

  const PAGE = 100;
  /** Most rows kept in the log; beyond it rows are dropped at the end far from the reader. */
  const MAX_ROWS = 1500;
  const POLL_MS = 1000;
  const POLL_HIDDEN_MS = 8000;
  const POLL_MAX_BACKOFF_MS = 10000;
  /** While the observer socket is up, a poll is only a safety net. */
  const POLL_SOCKET_MS = 15000;
  const SOCKET_RETRY_MAX_MS = 10000;
  /** `?poll=off`: no timed polls at all, the socket alone drives the live log. */
  const POLL_OFF = new URLSearchParams(location.search).get('poll') === 'off';
  const AGENTS_MS = 4000;
  const AGENTS_HIDDEN_MS = 15000;
  const AUX_MS = 5000;
  /** An optional endpoint that answered 404/405 is asked again only this often. */
  const MISSING_RETRY_MS = 60000;
  /** Content longer than this (characters or lines) is folded behind "more". */
  const FOLD_CHARS = 600;
  const FOLD_LINES = 8;
  /** How close to the bottom (px) still counts as "at the bottom". */
  const BOTTOM_SLACK = 48;
  const TOP_LOAD_PX = 120;

  // ---------------------------------------------------------------------------------------
  // DOM helpers

  const $ = (id) => document.getElementById(id);

  /**
   * Creates an element. String children become text nodes, so data can never become markup.
   * Attributes that are null, undefined or false are left out; `on*` attributes are listeners.
   */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value == null || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child == null || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function show(el, visible) {
    el.hidden = !visible;
  }

  function note(el, text) {
    el.textContent = text || '';
    show(el, Boolean(text));
  }

  // ---------------------------------------------------------------------------------------
  // Formatting

  function formatTime(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
    if (d.toDateString() === new Date().toDateString()) return time;
    return `${d.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${time}`;
  }

  function formatFull(iso) {
    return iso ? `${new Date(iso).toLocaleString()} (${iso})` : '';
  }

  function formatAgo(iso) {
    if (!iso) return 'never';
    const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    if (s < 5) return 'just now';
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return formatTime(iso);
  }

  function shortId(id) {
    return id ? String(id).slice(0, 8) : '';
  }

  function badgeClass(type) {
    return KNOWN_TYPES.includes(type) ? `t-${type}` : 't-other';
  }

  // ---------------------------------------------------------------------------------------
  // API
  //
  // Every call goes through `api`. A broker started with an admin token answers 401 to a
  // call without a valid token: the page then asks for the token (once, however many calls
  // were refused), keeps it in sessionStorage for this browser session and tries the refused
  // calls again. A 403 means the token was valid but may not do this (a project token).

  class ApiError extends Error {
    constructor(status, body, message) {
      super(message || (body && body.error) || `HTTP ${status}`);
      this.status = status;
      this.code = body && body.code;
    }
  }

  const TOKEN_KEY = 'agentbus.adminToken';

  /** sessionStorage may be unavailable (disabled storage): the page then works without it. */
  function readToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || '';
    } catch {
      return auth.memoryToken;
    }
  }

  function writeToken(token) {
    auth.memoryToken = token;
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // Kept in memory only (auth.memoryToken).
    }
    renderAuthControls();
  }

  const auth = {
    /** Fallback when sessionStorage cannot be used. */
    memoryToken: '',
    /** Calls refused with 401 that wait for a token: { resolve, reject } each. */
    waiting: [],
    /** The reader closed the token form: refused calls fail until they open it again. */
    dismissed: false,
    /** The broker has asked for a token at least once. */
    required: false,
    /** Shown in the form when it opens: why the last token failed. */
    lastError: '',
    /** What had focus before the form opened, to give it back. */
    returnFocus: null,
  };

  async function api(path, options = {}) {
    const init = { method: options.method || 'GET', headers: { Accept: 'application/json' } };
    if (options.body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(options.body);
    }
    for (;;) {
      const token = readToken();
      if (token) init.headers.Authorization = `Bearer ${token}`;
      else delete init.headers.Authorization;
      const response = await fetch(path, init);
      const text = await response.text();
      let body = null;
      try {
        body = text ? JSON.parse(text) : null;
      } catch {
        body = null;
      }
      if (response.status === 401) {
        // Another call may have been given a token meanwhile: try that one first.
        if (readToken() !== token) continue;
        await tokenNeeded(token, body);
        continue;
      }
      if (response.status === 403) {
        showForbidden(forbiddenMessage(token));
        throw new ApiError(403, body, token ? 'forbidden for this token' : 'forbidden');
      }
      if (!response.ok) throw new ApiError(response.status, body);
      return body;
    }
  }

  function forbiddenMessage(token) {
    return token
      ? 'The broker refused the stored token for this (403): is it a project token? The console needs the admin token.'
      : 'The broker refused this request (403 forbidden).';
  }

  /**
   * A call was refused for want of a valid token (`rejected` is the one it sent, if any).
   * Resolves once a new token is saved; throws when the reader closes the form instead.
   */
  function tokenNeeded(rejected, body) {
    auth.required = true;
    if (rejected && readToken() === rejected) {
      writeToken('');
      auth.lastError = 'The broker did not accept this token. Check it and try again.';
    }
    if (auth.dismissed) {
      renderAuthControls();
      return Promise.reject(new ApiError(401, body, 'this broker requires its admin token'));
    }
    openTokenForm();
    return new Promise((resolve, reject) => auth.waiting.push({ resolve, reject, body }));
  }

  function openTokenForm() {
    const dialog = $('auth-dialog');
    if (dialog.open) return;
    setAuthError(auth.required && !readToken() && auth.lastError ? auth.lastError : '');
    auth.lastError = '';
    auth.returnFocus = document.activeElement;
    $('auth-token').value = '';
    dialog.showModal();
    $('auth-token').focus();
  }

  function setAuthError(text) {
    note($('auth-error'), text);
  }

  function saveToken(event) {
    event.preventDefault();
    const token = $('auth-token').value.trim();
    if (!token) {
      setAuthError('Paste the admin token first.');
      $('auth-token').focus();
      return;
    }
    writeToken(token);
    auth.dismissed = false;
    setAuthError('');
    showForbidden('');
    closeTokenForm();
    const waiting = auth.waiting.splice(0);
    if (waiting.length) {
      for (const w of waiting) w.resolve();
    } else {
      // Opened by hand after the form was closed: nothing waits, so load everything again.
      reloadAll();
    }
  }

  /** Closing the form without a token: the refused calls fail and say why. */
  function dismissTokenForm() {
    // Calls were waiting: stop asking until the reader opens the form again ("Admin token…").
    if (auth.waiting.length) auth.dismissed = true;
    setAuthError('');
    const waiting = auth.waiting.splice(0);
    for (const w of waiting) w.reject(new ApiError(401, w.body, 'this broker requires its admin token'));
    if ($('auth-dialog').open) closeTokenForm();
    renderAuthControls();
  }

  function closeTokenForm() {
    const dialog = $('auth-dialog');
    $('auth-token').value = '';
    if (dialog.open) dialog.close();
    const back = auth.returnFocus;
    auth.returnFocus = null;
    // The button that opened the form may be hidden now (a token is stored): focus the picker.
    if (back && back.isConnected && back !== document.body && !back.closest('[hidden]')) back.focus();
    else if (back && back !== document.body) $('project-select').focus();
  }

  function forgetToken() {
    writeToken('');
    showForbidden('');
    setStatus('', 'token forgotten');
    setTimeout(() => {
      if ($('status').textContent === 'token forgotten') setStatus('', '');
    }, 4000);
    // Focus was on the button, which is now hidden.
    $('project-select').focus();
  }

  /** The header shows "Forget token" while one is stored, "Admin token…" while one is needed. */
  function renderAuthControls() {
    const stored = Boolean(readToken());
    show($('auth-forget'), stored);
    show($('auth-enter'), !stored && auth.required && auth.dismissed);
  }

  function showForbidden(text) {
    const banner = $('auth-forbidden');
    if (!text) {
      show(banner, false);
      return;
    }
    // Set only when it changes, so that a poll refused again does not announce it again.
    if ($('auth-forbidden-text').textContent !== text) $('auth-forbidden-text').textContent = text;
    show(banner, true);
  }

  /** Everything the current page shows, loaded again (after a token was entered by hand). */
  function reloadAll() {
    if (!state.projectId) {
      loadProjects();
      return;
    }
    loadProjects();
    if (!state.project) fetchProject(state.projectGen);
    reloadLog();
    // Again, with the token just entered.
    closeLive();
    openLive();
    refreshAgents();
    if (state.view !== 'messages') refreshAux(state.projectGen);
  }

  /** Endpoints still being built answer 404 (no route) or 405: the page then does without. */
  function isMissingEndpoint(err) {
    return err instanceof ApiError && (err.status === 404 || err.status === 405);
  }

  const projectPath = (suffix = '') => `/api/projects/${encodeURIComponent(state.projectId)}${suffix}`;

  // ---------------------------------------------------------------------------------------
  // State

  const state = {
    projects: [],
    /** Whether the project list has been loaded at least once (an empty list before that,
     * e.g. behind the token prompt, is not "no projects"). */
    projectsLoaded: false,
    /** undefined until the first route, so that it always opens something (null: the list). */
    projectId: undefined,
    project: null,
    view: 'messages',
    /** Bumped when the project changes: answers for an older project are dropped. */
    projectGen: 0,
    /** Bumped when the log reloads (project or filter change): older answers are dropped. */
    logGen: 0,
    filters: emptyFilters(),
    /** id -> { msg, row } for every message in the log. */
    entries: new Map(),
    /** Which messages in the log answer which (for "awaiting reply" and reply links). */
    repliesTo: new Map(),
    byCorrelation: new Map(),
    /** Poll cursor: every message up to it has been seen (with the current filters). */
    cursor: 0,
    atStart: false,
    /** True when rows were dropped at the bottom: the log no longer reaches the newest. */
    detached: false,
    loadingOlder: false,
    loadingNewer: false,
    polling: false,
    /** A fetch was asked for while one was out (or before the log loaded): run another
     *  as soon as it ends. */
    pollAgain: false,
    /** The latest page of the current log has loaded: the cursor is meaningful. */
    logReady: false,
    /** The project's observer socket: { ws, projectId, open, retries, timer }. */
    live: null,
    unseen: 0,
    /** The reader is at the bottom: keep them there as rows arrive or the layout changes. */
    stick: true,
    failures: 0,
    /** Senders seen in this project, for the fallback agents list and the datalists. */
    senders: new Map(),
    seenTypes: new Set(KNOWN_TYPES),
    agents: null,
    agentsMissingUntil: 0,
    /** File claims held now (pending or granted), and tasks by id (their message's id). */
    claims: null,
    tasks: new Map(),
    coordinationMissingUntil: 0,
    replyTarget: null,
    timers: { poll: 0, agents: 0, aux: 0, search: 0, countdown: 0 },
  };

  function emptyFilters() {
    return { type: '', sender: '', to: '', q: '', waiting: false, openTasks: false, correlation_id: '', thread: '' };
  }

  // ---------------------------------------------------------------------------------------
  // Routing: #/ is the project list, #/p/{id}[/dead-letters|/stats] a project's view.

  function parseHash() {
    const m = /^#\/p\/([0-9a-fA-F-]{36})(?:\/(messages|dead-letters|stats))?\/?$/.exec(location.hash);
    return m ? { projectId: m[1].toLowerCase(), view: m[2] || 'messages' } : { projectId: null, view: 'messages' };
  }

  function projectHash(id, view = 'messages') {
    return view === 'messages' ? `#/p/${id}` : `#/p/${id}/${view}`;
  }

  function route() {
    const { projectId, view } = parseHash();
    if (projectId !== state.projectId) openProject(projectId);
    if (projectId) setView(view);
  }

  // ---------------------------------------------------------------------------------------
  // Projects

  async function loadProjects() {
    try {
      const body = await api('/api/projects');
      state.projects = body.projects || [];
      state.projectsLoaded = true;
      renderProjects();
    } catch (err) {
      setStatus('error', `Projects: ${err.message}`);
    }
  }

  function renderProjects() {
    const select = $('project-select');
    const rows = $('project-rows');
    const options = [h('option', { value: '' }, 'Choose a project…')];
    const trs = [];
    for (const p of state.projects) {
      options.push(h('option', { value: p.id, selected: p.id === state.projectId }, p.name));
      trs.push(h('tr', {},
        h('td', {}, h('a', { href: projectHash(p.id) }, p.name)),
        h('td', { class: 'num' }, p.head_seq),
        h('td', { title: formatFull(p.created_at) }, formatTime(p.created_at)),
        h('td', {}, h('code', {}, p.id))));
    }
    // A project opened by link that the list does not have yet still shows as chosen.
    if (state.projectId && !state.projects.some((p) => p.id === state.projectId)) {
      options.push(h('option', { value: state.projectId, selected: true }, state.project ? state.project.name : shortId(state.projectId)));
    }
    select.replaceChildren(...options);
    rows.replaceChildren(...trs);
    show($('projects-empty'), state.projectsLoaded && state.projects.length === 0);
  }

  async function createProject(event) {
    event.preventDefault();
    const input = $('new-project-name');
    note($('create-error'), '');
    try {
      const created = await api('/api/projects', { method: 'POST', body: { name: input.value } });
      // The project token is shown once and then forgotten: it is not kept with the project.
      const { token, ...project } = created;
      input.value = '';
      state.projects.push(project);
      location.hash = projectHash(project.id);
      if (typeof token === 'string' && token) showProjectToken(project, token);
    } catch (err) {
      note($('create-error'), err.message);
    }
  }

  /**
   * A new project's token, which the broker shows only this once: in a notice that stays
   * (across views) until dismissed, with a button to copy it.
   */
  function showProjectToken(project, token) {
    const valueId = `project-token-${project.id}`;
    const copied = h('span', { class: 'copied muted', role: 'status' });
    const value = h('input', {
      id: valueId,
      class: 'token-value',
      type: 'text',
      readonly: true,
      spellcheck: 'false',
      autocomplete: 'off',
      value: token,
      onfocus: (e) => e.target.select(),
    });
    const copy = h('button', { type: 'button', onclick: () => copyToken(value, copied) }, 'Copy');
    const notice = h('section', { class: 'notice token-notice', 'aria-labelledby': `${valueId}-title` },
      h('div', { class: 'notice-body' },
        h('p', { id: `${valueId}-title`, class: 'notice-title' },
          'Project token for ', h('b', {}, project.name || shortId(project.id)),
          ': shown only once, give it to your agents.'),
        h('div', { class: 'token-row' },
          h('label', { class: 'visually-hidden', for: valueId }, `Project token for ${project.name || project.id}`),
          value, copy, copied)),
      h('button', {
        type: 'button',
        class: 'quiet small',
        'aria-label': `Dismiss the project token for ${project.name || project.id}`,
        title: 'Dismiss (the token cannot be shown again)',
        onclick: () => {
          notice.remove();
          if (document.activeElement === document.body) $('project-select').focus();
        },
      }, 'Dismiss'));
    $('notices').append(notice);
    copy.focus();
  }

  async function copyToken(input, feedback) {
    let ok = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(input.value);
        ok = true;
      }
    } catch {
      ok = false;
    }
    if (!ok) {
      // Plain http on another host has no clipboard API: copy the selection instead.
      input.focus();
      input.select();
      try {
        ok = document.execCommand('copy');
      } catch {
        ok = false;
      }
    }
    feedback.textContent = ok ? 'Copied.' : 'Select the token and copy it (Ctrl+C).';
  }

  // ---------------------------------------------------------------------------------------
  // Opening a project

  function stopTimers() {
    for (const key of Object.keys(state.timers)) clearTimeout(state.timers[key]);
  }

  /**
   * Opens the observer WebSocket of the current project (a connection without agent_id: it
   * receives every message as it commits). Each `message` frame asks for a fetch after the
   * cursor, so the filters keep applying on the server side; the socket is a wake-up, the
   * history API stays the one source of rows. If it fails, polling takes over and the socket
   * is tried again with backoff.
   */
  function openLive() {
    const projectId = state.projectId;
    const current = state.live && state.live.projectId === projectId ? state.live : null;
    if (current && (current.ws || current.timer)) return;
    const retries = current ? current.retries : 0;
    closeLive();
    if (!projectId || typeof WebSocket === 'undefined') return;
    const live = { ws: null, projectId, open: false, retries, timer: 0 };
    state.live = live;
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const token = readToken();
    const query = token ? `?token=${encodeURIComponent(token)}` : '';
    let ws;
    try {
      ws = new WebSocket(`${scheme}://${location.host}/ws/agent/messages/${projectId}${query}`);
    } catch (err) {
      retryLive(live);
      return;
    }
    live.ws = ws;
    ws.onopen = () => {
      if (state.live !== live) return;
      live.open = true;
      live.retries = 0;
      $('status').dataset.socket = 'open';
      // Anything committed between the last fetch and the socket's start.
      pollNow();
    };
    ws.onmessage = (event) => {
      if (state.live !== live) return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      if (frame.op === 'message') pollNow();
    };
    ws.onclose = () => {
      if (state.live !== live) return;
      live.open = false;
      live.ws = null;
      $('status').dataset.socket = 'closed';
      retryLive(live);
      // Polling resumes at its own pace while the socket is down.
      if (!state.polling) schedulePoll(state.logGen);
    };
  }

  function retryLive(live) {
    live.retries += 1;
    const delay = Math.min(SOCKET_RETRY_MAX_MS, 500 * 2 ** live.retries) * (0.5 + Math.random() / 2);
    live.timer = setTimeout(() => {
      live.timer = 0;
      if (state.live === live && state.projectId === live.projectId) openLive();
    }, delay);
  }

  function closeLive() {
    const live = state.live;
    if (!live) return;
    state.live = null;
    clearTimeout(live.timer);
    if (live.ws) {
      live.ws.onclose = null;
      live.ws.close();
    }
    $('status').dataset.socket = 'closed';
  }

  function openProject(projectId) {
    stopTimers();
    state.projectGen += 1;
    state.projectId = projectId;
    state.project = state.projects.find((p) => p.id === projectId) || null;
    state.senders = new Map();
    state.agents = null;
    state.agentsMissingUntil = 0;
    state.claims = null;
    state.tasks = new Map();
    state.coordinationMissingUntil = 0;
    $('claims').replaceChildren();
    $('claims-count').textContent = '';
    state.filters = emptyFilters();
    $('filters').reset();
    clearReplyTarget();
    show($('home'), !projectId);
    show($('project'), Boolean(projectId));
    renderProjects();
    if (!projectId) {
      document.title = 'agentbus console';
      setStatus('', '');
      closeLive();
      loadProjects();
      return;
    }
    for (const tab of document.querySelectorAll('.tabs [data-view]')) {
      tab.href = projectHash(projectId, tab.dataset.view);
    }
    renderTitle();
    if (!state.project) fetchProject(state.projectGen);
    $('agents').replaceChildren();
    $('dead-rows').replaceChildren();
    deadLettersKey = '';
    $('stats-body').replaceChildren();
    reloadLog();
    openLive();
    refreshAgents();
  }

  async function fetchProject(gen) {
    try {
      const project = await api(projectPath());
      if (gen !== state.projectGen) return;
      state.project = project;
      renderTitle();
      renderProjects();
    } catch (err) {
      if (gen !== state.projectGen) return;
      $('project-title').textContent = err.status === 404 ? 'No such project' : err.message;
    }
  }

  function renderTitle() {
    const name = state.project ? state.project.name : '';
    $('project-title').textContent = name;
    document.title = name ? `${name} · agentbus` : 'agentbus console';
  }

  function setView(view) {
    state.view = view;
    for (const tab of document.querySelectorAll('.tabs [data-view]')) {
      const active = tab.dataset.view === view;
      tab.setAttribute('aria-selected', String(active));
      tab.classList.toggle('active', active);
    }
    show($('view-messages'), view === 'messages');
    show($('view-dead-letters'), view === 'dead-letters');
    show($('view-stats'), view === 'stats');
    clearTimeout(state.timers.aux);
    if (view !== 'messages') refreshAux(state.projectGen);
  }

  // ---------------------------------------------------------------------------------------
  // The message log: loading

  /** The history URL with the server-side filters and the given paging parameters. */
  function historyPath(params) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) if (value != null) query.set(key, value);
    const f = state.filters;
    for (const key of ['type', 'sender', 'q', 'correlation_id', 'thread']) {
      if (f[key]) query.set(key, f[key]);
    }
    return projectPath(`/messages?${query}`);
  }

  /** Empties the log and loads the latest page with the current filters. */
  async function reloadLog() {
    const gen = ++state.logGen;
    clearTimeout(state.timers.poll);
    state.logReady = false;
    state.entries = new Map();
    state.repliesTo = new Map();
    state.byCorrelation = new Map();
    state.cursor = 0;
    state.atStart = false;
    state.detached = false;
    state.unseen = 0;
    $('rows').replaceChildren();
    updatePill();
    updateLogEdges();
    note($('filter-note'), '');
    try {
      const page = await api(historyPath({ limit: PAGE }));
      if (gen !== state.logGen) return;
      state.atStart = page.messages.length < PAGE;
      state.cursor = nextCursor(page, 0, PAGE);
      appendRows(page.messages);
      checkServerFilters(page.messages);
      updateLogEdges();
      scrollToBottom();
      state.failures = 0;
      setStatus('live', 'live');
      if (state.agents === null || state.agents.derived) renderAgents();
    } catch (err) {
      if (gen !== state.logGen) return;
      if (err.status === 404 && err.code === 'not_found') {
        note($('filter-note'), 'This project does not exist (any more).');
        setStatus('error', 'no such project');
        return;
      }
      // Nothing loaded: polling from cursor 0 would start at the oldest page, so the retry
      // is another load of the latest page.
      state.failures += 1;
      setStatus('error', `cannot load messages: ${err.message}`);
      state.timers.poll = setTimeout(() => {
        if (gen === state.logGen) reloadLog();
      }, pollDelay());
      return;
    }
    updateLogEdges();
    state.logReady = true;
    if (state.pollAgain && !state.polling) {
      state.pollAgain = false;
      schedulePoll(gen, 0);
    } else {
      schedulePoll(gen);
    }
  }

  /**
   * Where the next poll starts. A page shorter than the limit holds every match up to the
   * moment of the query, and head_seq was read before the query, so the cursor may jump to
   * head_seq: a filtered log then does not rescan messages it has already ruled out.
   */
  function nextCursor(page, cursor, limit) {
    const last = page.messages.length ? page.messages[page.messages.length - 1].seq : 0;
    if (page.messages.length >= limit) return Math.max(cursor, last);
    return Math.max(cursor, last, page.head_seq || 0);
  }

  /** When the next timed poll runs; null: none (the socket alone wakes the log). */
  function pollDelay() {
    if (state.failures > 0) return Math.min(POLL_MAX_BACKOFF_MS, POLL_MS * 2 ** state.failures);
    if (POLL_OFF) return null;
    if (state.live && state.live.open) return POLL_SOCKET_MS;
    return document.hidden ? POLL_HIDDEN_MS : POLL_MS;
  }

  function schedulePoll(gen, delay = pollDelay()) {
    clearTimeout(state.timers.poll);
    if (delay == null) return;
    state.timers.poll = setTimeout(() => poll(gen), delay);
  }

  async function poll(gen) {
    if (gen !== state.logGen) return;
    if (state.polling) {
      // A fetch (perhaps of an older generation) is still out: another follows it at once.
      state.pollAgain = true;
      return;
    }
    state.polling = true;
    let more = false;
    try {
      if (state.detached) await countNewer(gen);
      else more = await fetchNewer(gen);
      if (gen !== state.logGen) return;
      if (state.failures > 0 || $('status').dataset.state !== 'live') setStatus('live', 'live');
      state.failures = 0;
    } catch (err) {
      if (gen !== state.logGen) return;
      state.failures += 1;
      setStatus('error', `reconnecting… (${err.message})`);
    } finally {
      state.polling = false;
      if (state.pollAgain) {
        state.pollAgain = false;
        schedulePoll(state.logGen, 0);
      } else if (gen === state.logGen) {
        schedulePoll(gen, more ? 0 : pollDelay());
      }
    }
  }

  /**
   * One poll while the log reaches the newest message: append what came after the cursor.
   * Returns true when there is more to fetch right away.
   */
  async function fetchNewer(gen) {
    const page = await api(historyPath({ after_seq: state.cursor, limit: PAGE }));
    // Rows may have been dropped at the bottom meanwhile (older pages loaded): then these
    // would land after a gap, so leave them to the detached log's own paging.
    if (gen !== state.logGen || state.detached) return false;
    // Far behind (a burst, or a tab that slept) and following: jump to the latest page
    // rather than walking the whole gap page by page.
    if (page.messages.length >= PAGE && isFollowing() && page.head_seq - state.cursor > MAX_ROWS) {
      reloadLog();
      return false;
    }
    state.cursor = nextCursor(page, state.cursor, PAGE);
    if (page.messages.length) appendLive(page.messages);
    return page.messages.length >= PAGE && !state.detached;
  }

  /** One poll while rows were dropped at the bottom: only count what is newer. */
  async function countNewer(gen) {
    const page = await api(historyPath({ after_seq: lastSeq(), limit: PAGE }));
    if (gen !== state.logGen) return;
    state.unseen = page.messages.length;
    updatePill(page.messages.length >= PAGE ? `${PAGE}+ newer messages` : null);
  }

  function pollNow() {
    if (!state.projectId) return;
    // Before the latest page has loaded, the cursor means nothing yet: the load fetches
    // once more as soon as it is done.
    if (!state.logReady) {
      state.pollAgain = true;
      return;
    }
    schedulePoll(state.logGen, 0);
  }

  async function loadOlder() {
    if (state.atStart || state.loadingOlder || !state.projectId) return;
    const first = firstSeq();
    if (first == null) return;
    const gen = state.logGen;
    state.loadingOlder = true;
    updateLogEdges();
    try {
      const page = await api(historyPath({ before_seq: first, limit: PAGE }));
      if (gen !== state.logGen) return;
      if (page.messages.length < PAGE) state.atStart = true;
      keepScrollPosition(() => {
        prependRows(page.messages);
        trimRows('bottom');
      });
    } catch (err) {
      if (gen === state.logGen) setStatus('error', `cannot load older messages: ${err.message}`);
    } finally {
      state.loadingOlder = false;
      if (gen === state.logGen) updateLogEdges();
    }
  }

  /** Scrolling down a detached log: the next page after the last row. */
  async function loadNewer() {
    if (!state.detached || state.loadingNewer) return;
    const gen = state.logGen;
    state.loadingNewer = true;
    try {
      const page = await api(historyPath({ after_seq: lastSeq(), limit: PAGE }));
      if (gen !== state.logGen) return;
      keepScrollPosition(() => {
        appendRows(page.messages);
        trimRows('top');
      });
      if (page.messages.length < PAGE) {
        state.detached = false;
        state.cursor = nextCursor(page, lastSeq() || 0, PAGE);
        state.unseen = 0;
        updatePill();
      }
    } catch (err) {
      if (gen === state.logGen) setStatus('error', `cannot load newer messages: ${err.message}`);
    } finally {
      state.loadingNewer = false;
    }
  }

  // ---------------------------------------------------------------------------------------
  // The message log: rows

  const rowsEl = () => $('rows');

  function firstSeq() {
    const first = rowsEl().firstElementChild;
    return first ? Number(first.dataset.seq) : null;
  }

  function lastSeq() {
    const last = rowsEl().lastElementChild;
    return last ? Number(last.dataset.seq) : null;
  }

  function register(msg, row) {
    state.entries.set(msg.id, { msg, row });
    rowMessage.set(row, msg);
    if (msg.reply_to) {
      const list = state.repliesTo.get(msg.reply_to) || [];
      list.push(msg.id);
      state.repliesTo.set(msg.reply_to, list);
    }
    if (msg.correlation_id) {
      const list = state.byCorrelation.get(msg.correlation_id) || [];
      list.push(msg);
      state.byCorrelation.set(msg.correlation_id, list);
    }
    noteSender(msg);
    // A coordination notice about a task carries the task as it is now.
    const task = msg.metadata && msg.metadata.task;
    if (msg.message_type === 'coordination' && task && task.id) learnTask(task);
  }

  function unregister(row) {
    const msg = rowMessage.get(row);
    if (!msg) return;
    state.entries.delete(msg.id);
    if (msg.reply_to) {
      const list = (state.repliesTo.get(msg.reply_to) || []).filter((id) => id !== msg.id);
      if (list.length) state.repliesTo.set(msg.reply_to, list);
      else state.repliesTo.delete(msg.reply_to);
    }
    if (msg.correlation_id) {
      const list = (state.byCorrelation.get(msg.correlation_id) || []).filter((m) => m.id !== msg.id);
      if (list.length) state.byCorrelation.set(msg.correlation_id, list);
      else state.byCorrelation.delete(msg.correlation_id);
    }
  }

  /** Builds rows for messages not in the log yet, in the given (ascending) order. */
  function buildRows(messages) {
    const fragment = document.createDocumentFragment();
    const fresh = [];
    for (const msg of messages) {
      if (state.entries.has(msg.id)) continue;
      const row = renderMessage(msg);
      register(msg, row);
      row.hidden = !isShown(msg);
      refreshWaiting(msg.id);
      fragment.append(row);
      fresh.push(msg);
    }
    return { fragment, fresh };
  }

  function appendRows(messages) {
    const { fragment, fresh } = buildRows(messages);
    rowsEl().append(fragment);
    afterInsert(fresh);
    return fresh;
  }

  function prependRows(messages) {
    const { fragment, fresh } = buildRows(messages);
    rowsEl().prepend(fragment);
    afterInsert(fresh);
  }

  /** New messages from a poll: follow them when the reader is at the bottom, else count. */
  function appendLive(messages) {
    const following = isFollowing();
    if (!following && rowsEl().childElementCount + messages.length > MAX_ROWS) {
      // The reader is up in the history and the window is full: keep their rows, stop
      // appending, and let the pill say how much is newer.
      state.detached = true;
      state.unseen = messages.length;
      updatePill();
      return;
    }
    const fresh = appendRows(messages);
    if (following) {
      trimRows('top');
      scrollToBottom();
    } else {
      state.unseen += fresh.filter((m) => isShown(m)).length;
      updatePill();
    }
  }

  function afterInsert(fresh) {
    for (const msg of fresh) {
      if (msg.reply_to) refreshWaiting(msg.reply_to);
      if (msg.correlation_id) {
        for (const other of state.byCorrelation.get(msg.correlation_id) || []) refreshWaiting(other.id);
      }
    }
    ensureRovingFocus();
    updateEmpty();
    updateDatalists();
  }

  /** Keeps the log within MAX_ROWS by dropping rows at one end. */
  function trimRows(end) {
    const rows = rowsEl();
    let excess = rows.childElementCount - MAX_ROWS;
    if (excess <= 0) return;
    while (excess-- > 0) {
      const row = end === 'top' ? rows.firstElementChild : rows.lastElementChild;
      unregister(row);
      row.remove();
    }
    if (end === 'top') state.atStart = false;
    else state.detached = true;
    ensureRovingFocus();
    updateLogEdges();
  }

  // ---------------------------------------------------------------------------------------
  // Rendering one message

  /** The message each row shows (rows of the log and of the dead-letter list). */
  const rowMessage = new WeakMap();

  function renderMessage(msg) {
    const type = msg.message_type;
    const priority = Number(msg.priority);
    const row = h('li', {
      class: `msg${priority !== NORMAL_PRIORITY ? ` prio-${priority}` : ''}`,
      tabindex: '-1',
      'data-id': msg.id,
      'data-seq': msg.seq,
      'data-type': type,
      'aria-expanded': 'false',
    });
    const head = h('div', { class: 'msg-head' },
      h('span', { class: `badge ${badgeClass(type)}` }, type),
      priority !== NORMAL_PRIORITY && h('span', { class: `prio prio-${priority}` }, PRIORITY_NAMES[priority] || `p${priority}`),
      h('span', { class: 'from' },
        h('span', { class: 'agent-id' }, msg.sender_agent_id),
        h('span', { class: 'agent-type' }, msg.sender_agent_type)),
      h('span', { class: 'arrow', 'aria-label': 'to' }, '→'),
      renderRecipient(msg),
      h('span', { class: 'waiting-tag', hidden: true }, 'awaiting reply'),
      msg.task === true && h('span', { class: 'task-tag' }, 'task'),
      h('span', { class: 'when' },
        h('span', { class: 'seq' }, `#${msg.seq}`),
        h('time', { datetime: msg.created_at, title: formatFull(msg.created_at) }, formatTime(msg.created_at))));
    row.append(head, renderContent(msg.content));
    if (expectsReply(msg)) row.classList.add('expects-reply');
    if (msg.task === true) {
      row.classList.add('task');
      paintTask(row, msg.id);
    }
    return row;
  }

  function renderRecipient(msg) {
    if (msg.to) return h('span', { class: 'to to-agent' }, msg.to);
    if (msg.to_type) return h('span', { class: 'to to-type' }, h('span', { class: 'muted' }, 'type '), msg.to_type);
    return h('span', { class: 'to to-all' }, 'broadcast');
  }

  function renderContent(content) {
    const text = String(content ?? '');
    const long = text.length > FOLD_CHARS || text.split('\n').length > FOLD_LINES;
    const body = h('div', { class: `content${long ? ' folded' : ''}` }, text);
    if (!long) return body;
    return h('div', { class: 'content-wrap' }, body,
      h('button', { type: 'button', class: 'link more', 'data-action': 'more', 'aria-expanded': 'false' }, 'more'));
  }

  function toggleFold(button) {
    const body = button.parentElement.querySelector('.content');
    const folded = body.classList.toggle('folded');
    button.textContent = folded ? 'more' : 'less';
    button.setAttribute('aria-expanded', String(!folded));
  }

  function toggleRow(row) {
    const open = row.getAttribute('aria-expanded') !== 'true';
    row.setAttribute('aria-expanded', String(open));
    let details = row.querySelector(':scope > .details');
    if (open) {
      // Built on demand: most rows are never opened, and this keeps each row small.
      const fresh = renderDetails(rowMessage.get(row));
      if (details) details.replaceWith(fresh);
      else row.append(fresh);
      if (row.closest('#rows')) revealRow(row);
    } else if (details) {
      details.remove();
    }
  }

  /**
   * Scrolls an opened row's details into view without losing its head off the top. A reader
   * who opens a row to read it is no longer following the bottom unless it all fits.
   */
  function revealRow(row) {
    const log = $('log');
    const view = log.getBoundingClientRect();
    const box = row.getBoundingClientRect();
    if (box.bottom > view.bottom) log.scrollTop += Math.min(box.bottom - view.bottom, box.top - view.top);
    state.stick = atBottom();
  }

  function renderDetails(msg) {
    const items = [];
    const add = (label, ...value) => items.push(h('dt', {}, label), h('dd', {}, ...value));
    add('seq', String(msg.seq));
    add('id', h('code', {}, msg.id));
    add('from', `${msg.sender_agent_id} (${msg.sender_agent_type})`,
      msg.sender_session_id ? h('span', { class: 'muted' }, ` session ${shortId(msg.sender_session_id)}`) : null);
    add('to', msg.to ? msg.to : msg.to_type ? `agents of type ${msg.to_type}` : 'everyone (broadcast)');
    add('priority', `${PRIORITY_NAMES[msg.priority] || msg.priority} (${msg.priority})`);
    if (msg.correlation_id) {
      add('correlation', h('code', {}, msg.correlation_id), ' ',
        h('button', { type: 'button', class: 'link', 'data-action': 'filter-correlation', 'data-value': msg.correlation_id }, 'show all'));
    }
    if (msg.reply_to) add('reply to', jumpButton(msg.reply_to));
    const replies = state.repliesTo.get(msg.id);
    if (replies && replies.length) add('replies', ...replies.flatMap((id) => [jumpButton(id), ' ']));
    if (msg.client_msg_id) add('client msg id', h('code', {}, msg.client_msg_id));
    add('created', formatFull(msg.created_at));
    if (msg.expires_at) add('expires', formatFull(msg.expires_at));
    if (msg.reply_deadline) add('reply due', formatFull(msg.reply_deadline));
    if (msg.replied_at) add('replied', formatFull(msg.replied_at), msg.late ? h('span', { class: 'late' }, ' late') : null);
    const outcome = [
      msg.success === true && 'succeeded',
      msg.success === false && 'failed',
      msg.error && `error: ${typeof msg.error === 'string' ? msg.error : JSON.stringify(msg.error)}`,
      msg.duration_ms != null && `${msg.duration_ms} ms`,
    ].filter(Boolean);
    if (outcome.length) add('outcome', outcome.join(' · '));
    add('delivered', msg.delivered_at ? formatFull(msg.delivered_at) : h('span', { class: 'muted' }, 'not recorded'));
    add('read', msg.read_at ? formatFull(msg.read_at) : h('span', { class: 'muted' }, 'not recorded'));
    return h('div', { class: 'details' },
      h('dl', {}, items),
      h('div', { class: 'meta-label' }, 'metadata'),
      h('pre', { class: 'meta-json' }, JSON.stringify(msg.metadata ?? {}, null, 2)),
      h('div', { class: 'actions' },
        h('button', { type: 'button', 'data-action': 'reply' }, 'Reply'),
        h('button', { type: 'button', class: 'quiet', 'data-action': 'thread' }, 'Show thread')));
  }

  /** A link to another message: jumps to it when it is in the log. */
  function jumpButton(id) {
    const target = state.entries.get(id);
    const label = target ? `#${target.msg.seq} ${target.msg.message_type} from ${target.msg.sender_agent_id}` : shortId(id);
    return h('button', {
      type: 'button',
      class: 'link',
      'data-action': 'jump',
      'data-target': id,
      disabled: !target,
      title: target ? `message ${id}` : `message ${id} is not loaded`,
    }, label);
  }

  function jumpTo(id) {
    const entry = state.entries.get(id);
    if (!entry) return;
    const row = entry.row;
    row.hidden = false;
    row.scrollIntoView({ block: 'center' });
    setCurrentRow(row);
    row.focus({ preventScroll: true });
    row.classList.remove('flash');
    // Restart the highlight animation even when jumping to the same row twice.
    void row.offsetWidth;
    row.classList.add('flash');
  }

  // ---------------------------------------------------------------------------------------
  // "Awaiting reply": best effort, from what the log holds.

  // Only a request the broker tracks (sent with `expects_reply`: it gets a reply or a timeout
  // response) awaits a reply; a message that merely has the type "request" does not.
  function expectsReply(msg) {
    return msg.expects_reply === true;
  }

  function isAnswered(msg) {
    // replied_at is the broker's own record (when it has one); the rest is inferred from
    // what the log holds, and catches replies that arrived after this row was loaded.
    if (msg.replied_at || state.repliesTo.has(msg.id)) return true;
    const related = msg.correlation_id ? state.byCorrelation.get(msg.correlation_id) : null;
    return Boolean(related && related.some((other) => other.seq > msg.seq
      && other.sender_agent_id !== msg.sender_agent_id
      && other.message_type !== 'request'));
  }

  function isWaiting(msg) {
    return expectsReply(msg) && !isAnswered(msg);
  }

  function refreshWaiting(id) {
    const entry = state.entries.get(id);
    if (!entry || !entry.row.classList.contains('expects-reply')) return;
    const waiting = isWaiting(entry.msg);
    entry.row.classList.toggle('waiting', waiting);
    entry.row.querySelector('.waiting-tag').hidden = !waiting;
    entry.row.hidden = !isShown(entry.msg);
  }

  // ---------------------------------------------------------------------------------------
  // Filters. Type, sender, search, correlation and thread go to the server (the log reloads);
  // recipient and "awaiting reply" are applied here to the rows already loaded, since the
  // history API has no parameter for them.

  function isShown(msg) {
    const f = state.filters;
    if (f.to === '*' && msg.to) return false;
    if (f.to && f.to !== '*' && msg.to !== f.to) return false;
    if (f.waiting && !(state.entries.has(msg.id) && isWaiting(msg))) return false;
    if (f.openTasks && !(msg.task === true && taskState(msg.id) === 'open')) return false;
    return true;
  }

  function applyClientFilters() {
    for (const { msg, row } of state.entries.values()) row.hidden = !isShown(msg);
    ensureRovingFocus();
    updateEmpty();
    if (isFollowing()) scrollToBottom();
  }

  function readFilterForm() {
    return {
      type: $('f-type').value.trim(),
      sender: $('f-sender').value.trim(),
      to: $('f-to').value,
      q: $('f-q').value.trim(),
      waiting: $('f-waiting').checked,
      openTasks: $('f-open-tasks').checked,
      correlation_id: state.filters.correlation_id,
      thread: state.filters.thread,
    };
  }

  function setFilters(next) {
    const prev = state.filters;
    state.filters = next;
    const serverSide = ['type', 'sender', 'q', 'correlation_id', 'thread'].some((k) => prev[k] !== next[k]);
    renderChips();
    if (serverSide) reloadLog();
    else applyClientFilters();
  }

  function onFilterChange(event) {
    // Search waits for a pause in typing; the other fields apply at once.
    clearTimeout(state.timers.search);
    if (event && event.type === 'input' && event.target.id === 'f-q') {
      state.timers.search = setTimeout(() => setFilters(readFilterForm()), 400);
      return;
    }
    if (event && event.type === 'input') return;
    setFilters(readFilterForm());
  }

  function renderChips() {
    const chips = [];
    const f = state.filters;
    if (f.correlation_id) chips.push(chip(`correlation ${f.correlation_id}`, 'correlation_id'));
    if (f.thread) chips.push(chip(`thread of ${shortId(f.thread)}`, 'thread'));
    $('filter-chips').replaceChildren(...chips);
  }

  function chip(label, key) {
    return h('span', { class: 'chip' }, label,
      h('button', { type: 'button', class: 'chip-x', 'data-clear': key, 'aria-label': `Clear ${key} filter` }, '×'));
  }

  /**
   * The history API ignores parameters it does not know. When a search or correlation filter
   * comes back with messages that plainly do not match, say so instead of pretending.
   */
  function checkServerFilters(messages) {
    const f = state.filters;
    const notes = [];
    if (f.q) {
      const needle = f.q.toLowerCase();
      const matches = (m) => [m.content, m.sender_agent_id, m.sender_agent_type, m.message_type, m.to, JSON.stringify(m.metadata)]
        .some((v) => v && String(v).toLowerCase().includes(needle));
      if (messages.some((m) => !matches(m))) {
        notes.push('Search looks unavailable on this broker (results include messages without that text): showing them unfiltered.');
      }
    }
    if (f.correlation_id && messages.some((m) => m.correlation_id !== f.correlation_id)) {
      notes.push('Filtering by correlation id is not available on this broker yet.');
    }
    if (f.thread && !looksLikeThread(f.thread, messages)) {
      notes.push('Threads are not available on this broker yet: showing all messages.');
    }
    note($('filter-note'), notes.join(' '));
  }

  /** Whether every message is the root, replies within the set, or shares the root's correlation. */
  function looksLikeThread(rootId, messages) {
    const ids = new Set([rootId, ...messages.map((m) => m.id)]);
    const root = messages.find((m) => m.id === rootId);
    const correlation = root && root.correlation_id;
    return messages.every((m) => m.id === rootId || ids.has(m.reply_to)
      || (correlation && m.correlation_id === correlation));
  }

  // ---------------------------------------------------------------------------------------
  // Scrolling, the "new messages" pill, keyboard focus

  function atBottom() {
    const log = $('log');
    return log.scrollHeight - log.scrollTop - log.clientHeight <= BOTTOM_SLACK;
  }

  function isFollowing() {
    return !state.detached && (state.stick || atBottom());
  }

  function scrollToBottom() {
    const log = $('log');
    log.scrollTop = log.scrollHeight;
    state.stick = true;
  }

  /**
   * Rows that grow (a row opened, a font loaded, a note shown above the log) would push the
   * newest message out of view; a reader who was at the bottom stays there.
   */
  function watchLayout() {
    const observer = new ResizeObserver(() => {
      if (state.stick && !state.detached) $('log').scrollTop = $('log').scrollHeight;
    });
    observer.observe($('log'));
    observer.observe($('rows'));
  }

  /**
   * Runs `mutate` (rows added or removed above or below) so that the row the reader is looking
   * at stays where it is on screen. Done by hand rather than left to CSS scroll anchoring,
   * which does not anchor at scrollTop 0, exactly where older pages get loaded.
   */
  function keepScrollPosition(mutate) {
    const log = $('log');
    const anchor = firstVisibleRow();
    const before = anchor ? anchor.getBoundingClientRect().top : 0;
    mutate();
    if (anchor && anchor.isConnected) log.scrollTop += anchor.getBoundingClientRect().top - before;
  }

  /** The first row at or below the top of the log's viewport (binary search by position). */
  function firstVisibleRow() {
    const rows = rowsEl().children;
    const top = $('log').getBoundingClientRect().top;
    let lo = 0;
    let hi = rows.length - 1;
    let found = null;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const rect = rows[mid].getBoundingClientRect();
      if (rect.bottom > top) {
        found = rows[mid];
        hi = mid - 1;
      } else {
        lo = mid + 1;
      }
    }
    // Hidden rows have no box: step on to one that has.
    while (found && found.hidden) found = found.nextElementSibling;
    return found;
  }

  function updatePill(text) {
    const pill = $('new-pill');
    if (state.unseen > 0) {
      pill.textContent = text || `${state.unseen} new message${state.unseen === 1 ? '' : 's'} ↓`;
      show(pill, true);
    } else {
      show(pill, false);
    }
  }

  function onPill() {
    if (state.detached) {
      reloadLog();
      return;
    }
    scrollToBottom();
    state.unseen = 0;
    updatePill();
  }

  let scrollQueued = false;
  function onLogScroll() {
    // Decided at once, not in the frame below: a poll landing in between must not pull a
    // reader who just scrolled up back down.
    state.stick = atBottom();
    if (scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => {
      scrollQueued = false;
      const bottom = atBottom();
      if ($('log').scrollTop < TOP_LOAD_PX) loadOlder();
      if (bottom && state.detached) loadNewer();
      else if (bottom && state.unseen) {
        state.unseen = 0;
        updatePill();
      }
    });
  }

  function updateLogEdges() {
    const hasRows = rowsEl().childElementCount > 0;
    show($('load-older'), hasRows && !state.atStart);
    $('load-older').disabled = state.loadingOlder;
    $('load-older').textContent = state.loadingOlder ? 'Loading…' : 'Load older messages';
    show($('log-start'), hasRows && state.atStart);
  }

  function updateEmpty() {
    const rows = rowsEl();
    const anyShown = Array.prototype.some.call(rows.children, (row) => !row.hidden);
    const el = $('log-empty');
    el.textContent = rows.childElementCount ? 'No loaded messages match these filters.' : 'No messages.';
    show(el, !anyShown);
  }

  /**
   * One row of the log is in the tab order (the current one); arrow keys move between rows.
   * With thousands of rows, putting each in the tab order would make the page untabbable.
   */
  let currentRow = null;

  function setCurrentRow(row) {
    if (currentRow === row) return;
    if (currentRow) currentRow.tabIndex = -1;
    currentRow = row;
    if (row) row.tabIndex = 0;
  }

  function ensureRovingFocus() {
    if (currentRow && currentRow.isConnected && !currentRow.hidden) return;
    let row = rowsEl().lastElementChild;
    while (row && row.hidden) row = row.previousElementSibling;
    setCurrentRow(row);
  }

  function onRowsKeydown(event) {
    const row = event.target.closest('li.msg');
    if (!row || event.target !== row) return;
    if (event.key === 'Enter' || event.key === ' ') {
      event.preventDefault();
      toggleRow(row);
    } else if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
      event.preventDefault();
      let next = event.key === 'ArrowDown' ? row.nextElementSibling : row.previousElementSibling;
      while (next && next.hidden) next = event.key === 'ArrowDown' ? next.nextElementSibling : next.previousElementSibling;
      if (next) {
        setCurrentRow(next);
        next.focus();
      }
    }
  }

  /** Clicks in a list of messages: buttons act; elsewhere on a row, the row opens or closes. */
  function onRowsClick(event) {
    const button = event.target.closest('button');
    const row = event.target.closest('li.msg');
    if (!row) return;
    if (button) {
      onRowButton(button, row);
      return;
    }
    // Selecting text in a message must not fold it away.
    if (String(window.getSelection() || '')) return;
    if (event.target.closest('.details')) return;
    if (row.closest('#rows')) setCurrentRow(row);
    toggleRow(row);
  }

  function onRowButton(button, row) {
    const msg = rowMessage.get(row);
    switch (button.dataset.action) {
      case 'more':
        toggleFold(button);
        break;
      case 'jump':
        showView('messages');
        jumpTo(button.dataset.target);
        break;
      case 'filter-correlation':
        showView('messages');
        setFilters({ ...readFilterForm(), correlation_id: button.dataset.value });
        break;
      case 'thread':
        showView('messages');
        setFilters({ ...readFilterForm(), thread: msg.id });
        break;
      case 'reply':
        showView('messages');
        setReplyTarget(msg);
        break;
      case 'retry':
        retryDeadLetter(button, msg);
        break;
      default:
        break;
    }
  }

  function showView(view) {
    if (state.view === view) return;
    location.hash = projectHash(state.projectId, view);
    // At once, not on the hashchange: a jump needs the log visible to scroll to its row.
    setView(view);
  }

  // ---------------------------------------------------------------------------------------
  // Datalists (autocomplete for types and agents)

  function noteSender(msg) {
    const known = state.senders.get(msg.sender_agent_id);
    if (!known || known.last_seen_at < msg.created_at) {
      state.senders.set(msg.sender_agent_id, {
        agent_type: msg.sender_agent_type,
        last_seen_at: msg.created_at,
      });
    }
    state.seenTypes.add(msg.message_type);
  }

  let datalistKey = '';
  function updateDatalists() {
    const agents = new Set(state.senders.keys());
    for (const a of (state.agents && state.agents.list) || []) agents.add(a.agent_id);
    // Rebuilt only when something changed: this runs on every batch of new messages.
    const key = `${[...state.seenTypes].join()}|${[...agents].join()}`;
    if (key === datalistKey) return;
    datalistKey = key;
    $('known-types').replaceChildren(...[...state.seenTypes].sort().map((t) => h('option', { value: t })));
    $('known-agents').replaceChildren(...[...agents].sort().map((a) => h('option', { value: a })));
    const select = $('f-to');
    const current = select.value;
    select.replaceChildren(
      h('option', { value: '' }, 'any'),
      h('option', { value: '*' }, 'broadcast only'),
      ...[...agents].sort().map((a) => h('option', { value: a, selected: a === current }, a)));
    select.value = current;
  }

  // ---------------------------------------------------------------------------------------
  // Agents panel

  async function refreshAgents() {
    const gen = state.projectGen;
    clearTimeout(state.timers.agents);
    if (!state.projectId) return;
    if (Date.now() >= state.agentsMissingUntil) {
      try {
        const body = await api(projectPath('/agents'));
        if (gen !== state.projectGen) return;
        state.agents = { derived: false, list: body.agents || [] };
        state.agentsMissingUntil = 0;
      } catch (err) {
        if (gen !== state.projectGen) return;
        if (isMissingEndpoint(err)) {
          state.agentsMissingUntil = Date.now() + MISSING_RETRY_MS;
          state.agents = { derived: true, list: [] };
        } else {
          note($('agents-note'), `Cannot load agents: ${err.message}`);
        }
      }
    }
    renderAgents();
    await refreshCoordination(gen);
    if (gen !== state.projectGen) return;
    state.timers.agents = setTimeout(refreshAgents, document.hidden ? AGENTS_HIDDEN_MS : AGENTS_MS);
  }

  // ---------------------------------------------------------------------------------------
  // File claims and tasks: the claims held now, beside the agents, and each task's state on
  // its row of the log (from the tasks list, and from the broker's notices as they arrive).

  async function refreshCoordination(gen) {
    if (Date.now() < state.coordinationMissingUntil) return;
    try {
      const [claims, tasks] = await Promise.all([
        api(projectPath('/claims')),
        api(projectPath('/tasks?state=all&limit=1000')),
      ]);
      if (gen !== state.projectGen) return;
      state.claims = claims.claims || [];
      for (const task of tasks.tasks || []) learnTask(task);
      note($('claims-note'), '');
    } catch (err) {
      if (gen !== state.projectGen) return;
      if (isMissingEndpoint(err)) {
        state.coordinationMissingUntil = Date.now() + MISSING_RETRY_MS;
        state.claims = null;
        note($('claims-note'), 'File claims are not available on this broker.');
      } else {
        note($('claims-note'), `Cannot load claims: ${err.message}`);
      }
    }
    renderClaims();
  }

  /** Records a task's state (the newest wins) and repaints its row. */
  function learnTask(task) {
    const known = state.tasks.get(task.id);
    if (known && known.updated_at > task.updated_at) return;
    state.tasks.set(task.id, task);
    const entry = state.entries.get(task.id);
    if (entry) {
      paintTask(entry.row, task.id);
      entry.row.hidden = !isShown(entry.msg);
    }
  }

  function taskState(id) {
    const task = state.tasks.get(id);
    return task ? task.state : 'open';
  }

  function taskLabel(task) {
    if (!task || task.state === 'open') return 'task · open';
    if (task.holder && ['claimed', 'done', 'failed'].includes(task.state)) return `task · ${task.state} by ${task.holder}`;
    return `task · ${task.state}`;
  }

  function paintTask(row, id) {
    const tag = row.querySelector('.task-tag');
    if (!tag) return;
    const task = state.tasks.get(id);
    tag.textContent = taskLabel(task);
    tag.dataset.state = task ? task.state : 'open';
  }

  /** "in 12 s", "in 4 min", "in 2 h", or "now" once past. */
  function formatIn(iso) {
    const s = Math.round((new Date(iso).getTime() - Date.now()) / 1000);
    if (s <= 0) return 'now';
    if (s < 120) return `in ${s} s`;
    if (s < 7200) return `in ${Math.round(s / 60)} min`;
    return `in ${Math.round(s / 3600)} h`;
  }

  function renderClaims() {
    if (!state.claims) return;
    const list = state.claims;
    $('claims-count').textContent = list.length ? `(${list.length})` : '';
    $('claims').replaceChildren(...(list.length ? list.map(renderClaim) : [h('li', { class: 'muted' }, 'No paths are claimed.')]));
    tickCountdowns();
  }

  function renderClaim(claim) {
    const pending = claim.state === 'pending';
    const deadline = pending ? claim.decide_at : claim.expires_at;
    return h('li', { class: `claim ${claim.state}`, 'data-claim': claim.id },
      h('div', { class: 'claim-head' },
        h('span', { class: 'agent-id' }, claim.agent_id),
        h('span', { class: `claim-mode ${claim.shared ? 'shared' : 'exclusive'}` }, claim.shared ? 'shared' : 'exclusive'),
        h('span', { class: 'claim-state' }, pending ? 'pending' : 'held')),
      h('ul', { class: 'claim-paths' }, (claim.paths || []).map((p) => h('li', {}, h('code', {}, p)))),
      claim.reason ? h('div', { class: 'claim-reason' }, claim.reason) : null,
      h('div', { class: 'claim-when muted', title: formatFull(deadline) },
        pending ? 'objections close ' : 'expires ',
        h('span', { class: 'countdown', 'data-deadline': deadline }, formatIn(deadline))));
  }

  /** Counts the claims' windows and expiries down, every second while any is shown. */
  function tickCountdowns() {
    clearTimeout(state.timers.countdown);
    const shown = document.querySelectorAll('#claims .countdown[data-deadline]');
    for (const el of shown) el.textContent = formatIn(el.dataset.deadline);
    if (shown.length) state.timers.countdown = setTimeout(tickCountdowns, 1000);
  }

  /** Without the agents endpoint: who sent messages in this project, newest first. */
  function derivedAgents() {
    return [...state.senders.entries()]
      .map(([id, s]) => ({ agent_id: id, agent_type: s.agent_type, last_seen_at: s.last_seen_at, online: null }))
      .sort((a, b) => (a.last_seen_at < b.last_seen_at ? 1 : -1));
  }

  function renderAgents() {
    if (!state.agents) return;
    const derived = state.agents.derived;
    const list = derived ? derivedAgents() : [...state.agents.list].sort((a, b) =>
      (Number(Boolean(b.online)) - Number(Boolean(a.online))) || String(a.agent_id).localeCompare(String(b.agent_id)));
    note($('agents-note'), derived
      ? 'Agent presence is not available yet on this broker: these are the senders seen in the loaded messages.'
      : '');
    const online = list.filter((a) => a.online).length;
    $('agents-count').textContent = derived ? `(${list.length})` : `${online}/${list.length} online`;
    $('agents').replaceChildren(...(list.length ? list.map(renderAgent) : [h('li', { class: 'muted' }, 'No agents yet.')]));
    updateDatalists();
  }

  function renderAgent(agent) {
    const presence = agent.online === true ? 'online' : agent.online === false ? 'offline' : 'unknown';
    const facts = [];
    // How it last called in: a WebSocket, or requests over REST (the CLI too) or MCP.
    const via = agent.interface === 'mcp' ? 'MCP' : agent.interface === 'rest' ? 'REST' : agent.interface === 'websocket' ? 'WebSocket' : null;
    if (agent.online === true) {
      const n = (agent.session_ids || []).length;
      const online = n > 1 ? `online · ${n} sessions` : 'online';
      facts.push(via ? `${online} via ${via}` : online);
    } else {
      facts.push(`seen ${formatAgo(agent.last_seen_at)}`);
    }
    if (agent.queue_depth != null) facts.push(`queue ${agent.queue_depth}`);
    if (agent.ack_floor != null) facts.push(`acked #${agent.ack_floor}`);
    const caps = agent.capabilities || [];
    return h('li', { class: `agent ${presence}`, 'data-agent': agent.agent_id },
      h('span', { class: 'dot', title: presence, 'aria-label': presence, role: 'img' }),
      h('div', { class: 'agent-main' },
        h('div', { class: 'agent-name' },
          h('span', { class: 'agent-id' }, agent.agent_id),
          h('span', { class: 'agent-type' }, agent.agent_type)),
        h('div', { class: 'agent-facts muted', title: formatFull(agent.last_seen_at) }, facts.join(' · ')),
        caps.length ? h('div', { class: 'caps' }, caps.map((c) => h('span', { class: 'cap' }, typeof c === 'string' ? c : JSON.stringify(c)))) : null),
      agent.agent_id !== OPERATOR && h('button', {
        type: 'button',
        class: 'quiet small',
        'data-write-to': agent.agent_id,
        'aria-label': `Write to ${agent.agent_id}`,
        title: `Write to ${agent.agent_id}`,
      }, '✉'));
  }

  function onAgentsClick(event) {
    const button = event.target.closest('[data-write-to]');
    if (!button) return;
    $('c-to-kind').value = 'agent';
    $('c-to').value = button.dataset.writeTo;
    updateComposeTo();
    $('c-content').focus();
  }

  // ---------------------------------------------------------------------------------------
  // Dead letters and stats: fetched while their tab is open.

  async function refreshAux(gen) {
    clearTimeout(state.timers.aux);
    if (gen !== state.projectGen || state.view === 'messages') return;
    if (state.view === 'dead-letters') await refreshDeadLetters(gen);
    else await refreshStats(gen);
    if (gen !== state.projectGen || state.view === 'messages') return;
    state.timers.aux = setTimeout(() => refreshAux(gen), document.hidden ? AGENTS_HIDDEN_MS : AUX_MS);
  }

  async function refreshDeadLetters(gen) {
    try {
      const body = await api(projectPath('/dead-letters'));
      if (gen !== state.projectGen) return;
      const letters = body.dead_letters || [];
      const noteEl = $('dead-note');
      if (!letters.length) note(noteEl, 'No dead letters.');
      else if (noteEl.textContent === 'No dead letters.' || /not available/.test(noteEl.textContent)) note(noteEl, '');
      // Unchanged: leave the rows alone, so focus and open rows stay as the reader left them.
      const key = JSON.stringify(letters);
      if (key === deadLettersKey && $('dead-rows').childElementCount === letters.length) return;
      deadLettersKey = key;
      const open = new Set([...$('dead-rows').querySelectorAll('li.msg[aria-expanded="true"]')].map((r) => r.dataset.id));
      $('dead-rows').replaceChildren(...letters.map((letter) => renderDeadLetter(letter, open)));
    } catch (err) {
      if (gen !== state.projectGen) return;
      $('dead-rows').replaceChildren();
      note($('dead-note'), isMissingEndpoint(err) ? 'Dead letters are not available yet on this broker.' : `Cannot load dead letters: ${err.message}`);
    }
  }

  let deadLettersKey = '';

  function renderDeadLetter(letter, open) {
    const msg = letter.message || {};
    const row = renderMessage(msg);
    rowMessage.set(row, msg);
    row.tabIndex = 0;
    row.querySelector('.msg-head').append(
      h('span', { class: 'dead-reason' }, String(letter.reason || 'dead').replace(/_/g, ' ')),
      h('span', { class: 'muted', title: formatFull(letter.dead_at) }, `dead since ${formatTime(letter.dead_at)}`),
      letter.retried_as
        ? h('span', { class: 'muted' }, 'retried')
        : h('button', { type: 'button', class: 'quiet small', 'data-action': 'retry' }, 'Retry'));
    if (open.has(row.dataset.id)) toggleRow(row);
    return row;
  }

  /** Sends a dead letter again (the broker makes a new message naming the original). */
  async function retryDeadLetter(button, msg) {
    button.disabled = true;
    try {
      const stored = await api(projectPath(`/dead-letters/${encodeURIComponent(msg.id)}/retry`), { method: 'POST' });
      note($('dead-note'), `Sent again as message #${stored && stored.seq != null ? stored.seq : '?'}.`);
      pollNow();
    } catch (err) {
      note($('dead-note'), isMissingEndpoint(err) ? 'Retrying is not available on this broker.' : `Not retried: ${err.message}`);
    }
    refreshAux(state.projectGen);
  }

  async function refreshStats(gen) {
    try {
      const body = await api(projectPath('/stats'));
      if (gen !== state.projectGen) return;
      note($('stats-note'), '');
      $('stats-body').replaceChildren(renderValue(body, 0));
    } catch (err) {
      if (gen !== state.projectGen) return;
      $('stats-body').replaceChildren();
      note($('stats-note'), isMissingEndpoint(err) ? 'Stats are not available yet on this broker.' : `Cannot load stats: ${err.message}`);
    }
  }

  /** Any JSON value, generically: objects as labelled lists, nested a few levels deep. */
  function renderValue(value, depth) {
    if (value === null || typeof value !== 'object') {
      return h('span', { class: `stat-value ${typeof value}` }, value === null ? '—' : formatScalar(value));
    }
    const scalars = Array.isArray(value) && value.every((v) => v === null || typeof v !== 'object');
    if (scalars) return h('span', { class: 'stat-value' }, value.length ? value.map(formatScalar).join(', ') : '—');
    if (depth >= 3 || Array.isArray(value)) return h('pre', { class: 'meta-json' }, JSON.stringify(value, null, 2));
    return h('dl', { class: depth === 0 ? 'stats-grid' : 'stats-nested' },
      Object.entries(value).flatMap(([key, v]) => [
        h('dt', {}, key.replace(/_/g, ' ')),
        h('dd', {}, renderValue(v, depth + 1)),
      ]));
  }

  function formatScalar(v) {
    if (typeof v === 'number') return Number.isInteger(v) ? v.toLocaleString() : v.toLocaleString(undefined, { maximumFractionDigits: 3 });
    return String(v);
  }

  // ---------------------------------------------------------------------------------------
  // Compose

  function fillTypeSelect() {
    $('c-type').replaceChildren(...KNOWN_TYPES.map((t) => h('option', { value: t, selected: t === 'coordination' }, t)));
  }

  function updateComposeTo() {
    const kind = $('c-to-kind').value;
    const input = $('c-to');
    show(input, kind !== 'broadcast');
    input.required = kind !== 'broadcast';
    input.placeholder = kind === 'type' ? 'agent type' : 'agent id';
    if (kind === 'agent') input.setAttribute('list', 'known-agents');
    else input.removeAttribute('list');
  }

  function setReplyTarget(msg) {
    state.replyTarget = msg;
    $('c-to-kind').value = msg.sender_agent_id === OPERATOR ? 'broadcast' : 'agent';
    $('c-to').value = msg.sender_agent_id === OPERATOR ? '' : msg.sender_agent_id;
    if (msg.message_type === 'request') $('c-type').value = 'response';
    updateComposeTo();
    renderReplyNote();
    $('c-content').focus();
  }

  function clearReplyTarget() {
    state.replyTarget = null;
    renderReplyNote();
  }

  function renderReplyNote() {
    const target = state.replyTarget;
    let el = document.querySelector('#compose .reply-chip');
    if (!target) {
      if (el) el.remove();
      return;
    }
    const fresh = h('span', { class: 'chip reply-chip' }, `replying to #${target.seq} from ${target.sender_agent_id}`,
      h('button', { type: 'button', class: 'chip-x', 'data-clear': 'reply', 'aria-label': 'Cancel reply' }, '×'));
    if (el) el.replaceWith(fresh);
    else $('compose').querySelector('.compose-row').append(fresh);
  }

  async function sendMessage(event) {
    event.preventDefault();
    const noteEl = $('compose-note');
    note(noteEl, '');
    const kind = $('c-to-kind').value;
    const to = $('c-to').value.trim();
    const body = {
      sender_agent_id: OPERATOR,
      sender_agent_type: OPERATOR,
      type: $('c-type').value,
      priority: Number($('c-priority').value),
      content: $('c-content').value,
    };
    if (!body.content.trim()) {
      note(noteEl, 'Write a message first.');
      return;
    }
    if (kind !== 'broadcast' && !to) {
      note(noteEl, kind === 'type' ? 'Name the agent type to send to.' : 'Name the agent to send to.');
      return;
    }
    if (kind === 'agent') body.to = to;
    if (kind === 'type') body.to_type = to;
    const metadataText = $('c-metadata').value.trim();
    if (metadataText) {
      try {
        body.metadata = JSON.parse(metadataText);
      } catch {
        body.metadata = undefined;
      }
      if (!body.metadata || typeof body.metadata !== 'object' || Array.isArray(body.metadata)) {
        note(noteEl, 'Metadata must be a JSON object.');
        return;
      }
    }
    if (state.replyTarget) {
      body.reply_to = state.replyTarget.id;
      if (state.replyTarget.correlation_id) body.correlation_id = state.replyTarget.correlation_id;
    }
    const button = $('c-send');
    button.disabled = true;
    try {
      const stored = await api(projectPath('/messages'), { method: 'POST', body });
      $('c-content').value = '';
      clearReplyTarget();
      if (kind === 'type' && !stored.to_type) {
        note(noteEl, `This broker does not address agent types yet: message #${stored.seq} went to everyone.`);
      }
      // The reader wrote it, so they want to see it: follow the log to it.
      if (!state.detached) scrollToBottom();
      pollNow();
    } catch (err) {
      note(noteEl, `Not sent: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Status line

  function setStatus(kind, text) {
    const el = $('status');
    el.dataset.state = kind;
    el.textContent = text;
  }

  // ---------------------------------------------------------------------------------------
  // Wiring

  function onVisibilityChange() {
    if (document.hidden || !state.projectId) return;
    // Back in view: catch up at once instead of waiting out the slow hidden-tab interval.
    pollNow();
    refreshAgents();
    if (state.view !== 'messages') refreshAux(state.projectGen);
  }

  function init() {
    fillTypeSelect();
    updateComposeTo();
    $('project-select').addEventListener('change', (e) => {
      location.hash = e.target.value ? projectHash(e.target.value) : '#/';
    });
    $('create-project').addEventListener('submit', createProject);

    $('auth-form').addEventListener('submit', saveToken);
    $('auth-cancel').addEventListener('click', dismissTokenForm);
    // Escape closes the form like Cancel does.
    $('auth-dialog').addEventListener('cancel', (e) => {
      e.preventDefault();
      dismissTokenForm();
    });
    $('auth-enter').addEventListener('click', openTokenForm);
    $('auth-forget').addEventListener('click', forgetToken);
    $('auth-forbidden-change').addEventListener('click', openTokenForm);
    $('auth-forbidden-close').addEventListener('click', () => showForbidden(''));
    renderAuthControls();

    const filters = $('filters');
    filters.addEventListener('change', onFilterChange);
    filters.addEventListener('input', onFilterChange);
    filters.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && e.target.matches('input:not([type=checkbox])')) {
        e.preventDefault();
        onFilterChange();
      }
    });
    filters.addEventListener('submit', (e) => {
      e.preventDefault();
      onFilterChange();
    });
    // A reset clears the form fields after the event: read them on the next turn.
    filters.addEventListener('reset', () => setTimeout(() => {
      if (state.projectId) setFilters(emptyFilters());
    }));
    $('filter-chips').addEventListener('click', (e) => {
      const button = e.target.closest('[data-clear]');
      if (button) setFilters({ ...readFilterForm(), [button.dataset.clear]: '' });
    });

    const log = $('log');
    log.addEventListener('scroll', onLogScroll, { passive: true });
    watchLayout();
    $('load-older').addEventListener('click', loadOlder);
    $('new-pill').addEventListener('click', onPill);
    for (const list of [$('rows'), $('dead-rows')]) {
      list.addEventListener('click', onRowsClick);
      list.addEventListener('keydown', onRowsKeydown);
    }
    $('rows').addEventListener('focusin', (e) => {
      if (e.target.matches('li.msg')) setCurrentRow(e.target);
    });
    $('agents').addEventListener('click', onAgentsClick);

    $('compose').addEventListener('submit', sendMessage);
    $('compose').addEventListener('click', (e) => {
      if (e.target.closest('[data-clear="reply"]')) clearReplyTarget();
    });
    $('c-to-kind').addEventListener('change', updateComposeTo);
    $('c-content').addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) $('compose').requestSubmit();
    });

    window.addEventListener('hashchange', route);
    document.addEventListener('visibilitychange', onVisibilityChange);
    loadProjects();
    route();
  }

  init();
})();
