// Browser end-to-end test of the agentbus console, driven by tests/api/console.rs.
//
//   node tests/console/e2e.mjs BASE_URL PROJECT_ID ARTEFACT_DIR
//
// The Rust side starts a broker, fills a project with messages from two WebSocket agents
// (alpha and beta) and runs this script. Lines starting with "@@ " on stdout ask the Rust side
// to act; everything else on stdout is progress. Exit status 0 means every check passed.
//
//   @@ SEND_LIVE                  alpha sends a message over its WebSocket
//   @@ EXPECT <agent> <content>   <agent> must receive a message with this content
//   @@ DISCONNECT <agent>         <agent> closes its WebSocket
//   @@ SKIP <what>                a check was skipped (reported by the Rust side)
//
// Every wait is on a condition with a time limit; nothing sleeps for a fixed time.

import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [baseUrl, projectId, artefactDir] = process.argv.slice(2);
if (!baseUrl || !projectId || !artefactDir) {
  console.error('usage: node e2e.mjs BASE_URL PROJECT_ID ARTEFACT_DIR');
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const WAIT_MS = 10_000;
/** The console's first page and its scroll-back page size. */
const PAGE = 100;
/** Endpoints other work adds to the broker; the console must cope without them. */
const OPTIONAL_ENDPOINTS = ['agents', 'dead-letters', 'stats'];

const request = (cmd) => console.log(`@@ ${cmd}`);
const step = (text) => console.log(`console e2e: ${text}`);

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

async function getJson(urlPath) {
  const response = await fetch(new URL(urlPath, baseUrl));
  const body = await response.json().catch(() => null);
  return { status: response.status, body };
}

async function postJson(urlPath, body) {
  const response = await fetch(new URL(urlPath, baseUrl), {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  check(response.status === 201, `POST ${urlPath} answered ${response.status}`);
  return response.json();
}

const api = (suffix) => `/api/projects/${projectId}${suffix}`;
const KNOWN_TYPES = new Set([
  'status', 'request', 'response', 'discovery', 'coordination', 'task_assignment',
  'status_update', 'escalation', 'result_report', 'error_report', 'heartbeat',
  'capability_query', 'capability_response',
]);
const badgeClass = (type) => (KNOWN_TYPES.has(type) ? `t-${type}` : 't-other');

/** The rows of the log as the page shows them. */
function readRows(page) {
  return page.$$eval('#rows > li.msg', (rows) => rows.map((row) => ({
    id: row.dataset.id,
    seq: Number(row.dataset.seq),
    type: row.dataset.type,
    hidden: row.hidden,
    badge: row.querySelector('.badge').className,
    sender: row.querySelector('.from .agent-id').textContent,
    content: row.querySelector('.content').textContent,
  })));
}

async function waitRows(page, what, predicate, arg) {
  await page.waitForFunction(predicate, arg, { timeout: WAIT_MS, polling: 50 }).catch((err) => {
    throw new Error(`timed out waiting for ${what}: ${err.message.split('\n')[0]}`);
  });
}

async function main() {
  mkdirSync(artefactDir, { recursive: true });

  // Ground truth from the API, and which optional endpoints exist yet.
  const { body: all } = await getJson(api('/messages?limit=1000'));
  const history = all.messages;
  check(history.length > PAGE, `the project needs more than ${PAGE} messages, has ${history.length}`);
  const missing = new Set();
  for (const endpoint of OPTIONAL_ENDPOINTS) {
    const { status } = await getJson(api(`/${endpoint}`));
    if (status === 404 || status === 405) missing.add(endpoint);
  }
  step(`${history.length} messages; endpoints missing: ${[...missing].join(', ') || 'none'}`);

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    chromiumSandbox: false,
    args: [
      '--disable-gpu',
      '--disable-quic',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
  });
  const errors = [];
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, colorScheme: 'light' });
    const page = await context.newPage();
    page.on('pageerror', (err) => errors.push(`page error: ${err.message}`));
    page.on('console', (msg) => {
      if (msg.type() !== 'error') return;
      // The browser logs every 404 it fetches. The console asks for endpoints that may not
      // exist yet on purpose; those 404s, and only those, are expected.
      const url = msg.location().url || '';
      const endpoint = OPTIONAL_ENDPOINTS.find((e) => url.endsWith(`/${e}`));
      if (endpoint && missing.has(endpoint) && /status of 40[45]/.test(msg.text())) return;
      errors.push(`console error: ${msg.text()} (${url})`);
    });

    await checkProjects(page);
    await checkFirstPage(page, history);
    await checkSafeRendering(page, history);
    await checkDetailsAndReplies(page, history);
    await checkScrollBack(page, history);
    await checkLive(page);
    await checkLiveWithoutPolling(context);
    await checkNewMessagesPill(page);
    await checkTypeFilter(page, history);
    await checkAgents(page, missing);
    await checkCompose(page);
    await checkPresenceChange(page, missing);
    await checkCoordination(page);
    await checkOtherViews(page, missing);

    await page.locator('a[data-view="messages"]').click();
    await page.evaluate(() => { const log = document.getElementById('log'); log.scrollTop = log.scrollHeight; });
    await page.screenshot({ path: path.join(artefactDir, 'console.png') });
    await checkNarrowWindow(page);

    check(errors.length === 0, `the page logged errors:\n  ${errors.join('\n  ')}`);
    step('all checks passed');
  } finally {
    await browser.close();
  }
}

/** The project list; creating a project; the URL names the project and survives a reload. */
async function checkProjects(page) {
  await page.goto(`${baseUrl}/`);
  await waitRows(page, 'the project list', (id) =>
    [...document.querySelectorAll('#project-rows a')].some((a) => a.getAttribute('href') === `#/p/${id}`), projectId);
  await page.locator('#new-project-name').fill('made in the browser');
  await page.locator('#create-project button[type="submit"]').click();
  await page.waitForURL(/#\/p\/[0-9a-f-]{36}$/, { timeout: WAIT_MS });
  const created = page.url();
  await waitRows(page, 'the new project', () => document.getElementById('project-title').textContent === 'made in the browser');
  await page.reload();
  check(page.url() === created, 'a reload keeps the project');
  await waitRows(page, 'the new project after a reload', () =>
    document.getElementById('project-title').textContent === 'made in the browser'
    && document.getElementById('log-empty').textContent === 'No messages.' && !document.getElementById('log-empty').hidden);
  await page.locator('#project-select').selectOption(projectId);
  await page.waitForURL(`${baseUrl}/#/p/${projectId}`, { timeout: WAIT_MS });
  step('projects: listed, created, kept across a reload, picked');
}

/** The latest page, in seq order, with the right badges; nothing older than it. */
async function checkFirstPage(page, history) {
  const expected = history.slice(-PAGE);
  await waitRows(page, 'the first page of messages',
    (n) => document.querySelectorAll('#rows > li.msg').length === n, expected.length);
  const rows = await readRows(page);
  check(rows.map((r) => r.seq).join() === expected.map((m) => m.seq).join(),
    `rows are the latest ${PAGE} messages in order: got seqs ${rows[0].seq}..${rows[rows.length - 1].seq}`);
  for (const [i, row] of rows.entries()) {
    const msg = expected[i];
    check(row.type === msg.message_type, `row ${row.seq} has type ${msg.message_type}`);
    check(row.badge.split(' ').includes(badgeClass(msg.message_type)),
      `row ${row.seq} (${msg.message_type}) has badge class ${badgeClass(msg.message_type)}, not "${row.badge}"`);
    check(row.sender === msg.sender_agent_id, `row ${row.seq} shows its sender`);
  }
  const atBottom = await page.$eval('#log', (log) => log.scrollHeight - log.scrollTop - log.clientHeight < 2);
  check(atBottom, 'the log starts scrolled to the newest message');
  step('first page in order with the right badges');
}

/** Content with markup is shown as text, never interpreted. */
async function checkSafeRendering(page, history) {
  const hostile = history.find((m) => m.content.includes('<img'));
  check(hostile, 'the project has a message with markup in its content');
  const shown = await page.$eval(`#rows > li[data-id="${hostile.id}"] .content`, (el) => el.textContent);
  check(shown === hostile.content, 'markup in content is shown verbatim');
  const injected = await page.evaluate(() => ({
    imgs: document.querySelectorAll('#rows img, #rows script').length,
    flag: window.__xss === undefined,
  }));
  check(injected.imgs === 0 && injected.flag, 'content never becomes elements or runs');
  step('content is rendered as text');
}

/** A row opens to its metadata; reply links jump; unanswered requests are flagged. */
async function checkDetailsAndReplies(page, history) {
  const reply = history.find((m) => m.reply_to && history.some((o) => o.id === m.reply_to));
  check(reply, 'the project has a reply to a loaded message');
  const row = page.locator(`#rows > li[data-id="${reply.id}"]`);
  await row.locator('.msg-head').click();
  const meta = await row.locator('.meta-json').textContent({ timeout: WAIT_MS });
  check(JSON.stringify(JSON.parse(meta)) === JSON.stringify(reply.metadata), 'details show the metadata as JSON');
  check(await row.getAttribute('aria-expanded') === 'true', 'the open row says so');

  await row.locator('button[data-action="jump"]').click();
  await waitRows(page, 'the jump to the replied-to message',
    (id) => document.activeElement && document.activeElement.dataset.id === id, reply.reply_to);

  // Enter on the focused row opens it too (keyboard use).
  await page.keyboard.press('Enter');
  await waitRows(page, 'Enter to open a row',
    (id) => document.querySelector(`#rows > li[data-id="${id}"]`).getAttribute('aria-expanded') === 'true', reply.reply_to);
  await page.keyboard.press('Enter');

  const answered = history.find((m) => m.id === reply.reply_to);
  const unanswered = history.find((m) => m.message_type === 'request' && !history.some((o) => o.reply_to === m.id)
    && !(m.correlation_id && history.some((o) => o.correlation_id === m.correlation_id && o.seq > m.seq)));
  check(unanswered, 'the project has an unanswered request');
  const classes = await page.evaluate(([a, u]) => [a, u].map((id) =>
    document.querySelector(`#rows > li[data-id="${id}"]`).classList.contains('waiting')), [answered.id, unanswered.id]);
  check(!classes[0] && classes[1], 'only the unanswered request is flagged as awaiting a reply');

  await page.locator('#f-waiting').check();
  await waitRows(page, 'the "awaiting reply" filter', (id) => {
    const shown = [...document.querySelectorAll('#rows > li.msg')].filter((r) => !r.hidden);
    return shown.length === 1 && shown[0].dataset.id === id;
  }, unanswered.id);
  await page.locator('#f-waiting').uncheck();
  step('details, reply links and "awaiting reply" work');
}

/** Scrolling to the top loads the previous page and keeps the reader's place. */
async function checkScrollBack(page, history) {
  // Scroll and measure in one go: the older page may arrive right after the scroll.
  const before = await page.evaluate(() => {
    const first = document.querySelector('#rows > li.msg');
    document.getElementById('log').scrollTop = 0;
    return { id: first.dataset.id, top: first.getBoundingClientRect().top };
  });
  const anchorTop = before.top;
  await waitRows(page, 'the older page',
    (n) => document.querySelectorAll('#rows > li.msg').length === n, Math.min(history.length, 2 * PAGE));
  const rows = await readRows(page);
  const expected = history.slice(-2 * PAGE);
  check(rows.map((r) => r.seq).join() === expected.map((m) => m.seq).join(), 'older rows are prepended in order');
  const anchorAfter = await page.$eval(`#rows > li[data-id="${before.id}"]`, (el) => el.getBoundingClientRect().top);
  check(Math.abs(anchorAfter - anchorTop) <= 2, `the reader's place is kept (moved ${anchorAfter - anchorTop}px)`);
  if (history.length <= 2 * PAGE) {
    await waitRows(page, 'the start-of-history marker', () => !document.getElementById('log-start').hidden);
  }
  step('scroll-back loads the previous page in place');
}

/** A message sent over a WebSocket appears without reload, and the log follows it. */
async function checkLive(page) {
  await page.evaluate(() => { const log = document.getElementById('log'); log.scrollTop = log.scrollHeight; });
  const count = await page.$$eval('#rows > li.msg', (rows) => rows.length);
  request('SEND_LIVE');
  await waitRows(page, 'the live message', (n) => {
    const rows = document.querySelectorAll('#rows > li.msg');
    return rows.length === n + 1 && rows[rows.length - 1].textContent.includes('live from alpha');
  }, count);
  await waitRows(page, 'the log to follow the live message', () => {
    const log = document.getElementById('log');
    return log.scrollHeight - log.scrollTop - log.clientHeight < 2;
  });
  step('a live message appeared without reload');
}

/**
 * With timed polling switched off (`?poll=off`), the observer WebSocket alone brings a
 * message committed over REST into the log.
 */
async function checkLiveWithoutPolling(context) {
  const page = await context.newPage();
  try {
    await page.goto(`${baseUrl}/?poll=off#/p/${projectId}`);
    await waitRows(page, 'the observer socket to open', () => document.getElementById('status').dataset.socket === 'open');
    await waitRows(page, 'the first page', () => document.querySelectorAll('#rows > li.msg').length > 0);
    const count = await page.$$eval('#rows > li.msg', (rows) => rows.length);
    const started = Date.now();
    await postJson(api('/messages'), {
      sender_agent_id: 'alpha', sender_agent_type: 'planner', type: 'status', content: 'pushed, not polled',
    });
    await waitRows(page, 'the pushed message', (n) => {
      const rows = document.querySelectorAll('#rows > li.msg');
      return rows.length === n + 1 && rows[rows.length - 1].textContent.includes('pushed, not polled');
    }, count);
    step(`with polling off, a REST message appeared through the observer socket in ${Date.now() - started} ms`);
  } finally {
    await page.close();
  }
}

/** Scrolled up, new messages are counted in a pill that jumps down. */
async function checkNewMessagesPill(page) {
  await page.evaluate(() => { document.getElementById('log').scrollTop = 300; });
  await postJson(api('/messages'), {
    sender_agent_id: 'alpha', sender_agent_type: 'planner', type: 'discovery', content: 'found the flaky test',
  });
  await waitRows(page, 'the "new messages" pill', () => {
    const pill = document.getElementById('new-pill');
    return !pill.hidden && /^1 new message\b/.test(pill.textContent);
  });
  const scrollTop = await page.$eval('#log', (log) => log.scrollTop);
  check(scrollTop === 300, 'a reader who scrolled up is not moved');
  await page.locator('#new-pill').click();
  await waitRows(page, 'the pill to jump down', () => {
    const log = document.getElementById('log');
    return document.getElementById('new-pill').hidden && log.scrollHeight - log.scrollTop - log.clientHeight < 2;
  });
  step('the "new messages" pill counts and jumps');
}

/** A type filter reloads the log with only that type. */
async function checkTypeFilter(page, history) {
  const requests = history.filter((m) => m.message_type === 'request');
  await page.locator('#f-type').fill('request');
  await page.locator('#f-type').press('Enter');
  await waitRows(page, 'the type filter', (n) => {
    const rows = [...document.querySelectorAll('#rows > li.msg')];
    return rows.length === n && rows.every((r) => r.dataset.type === 'request');
  }, requests.length);
  await page.locator('#filters button[type="reset"]').click();
  await waitRows(page, 'the cleared filter', (n) => document.querySelectorAll('#rows > li.msg').length === n, PAGE);
  step('the type filter works');
}

/** Both agents are listed; online where the broker reports presence. */
async function checkAgents(page, missing) {
  if (missing.has('agents')) {
    await waitRows(page, 'the derived agents', () => ['alpha', 'beta'].every((a) =>
      document.querySelector(`#agents li[data-agent="${a}"]`)));
    const noted = await page.$eval('#agents-note', (el) => !el.hidden && /not available/.test(el.textContent));
    check(noted, 'the agents panel says presence is not available');
    request('SKIP online/offline presence: GET /agents answers 404');
    step('agents listed from messages (endpoint missing)');
    return;
  }
  await waitRows(page, 'both agents online', () => ['alpha', 'beta'].every((a) =>
    document.querySelector(`#agents li.online[data-agent="${a}"]`)));
  step('both agents online');
}

/** The operator's message reaches beta over its WebSocket. */
async function checkCompose(page) {
  const content = `Operator: please rebase onto main (${Date.now()})`;
  await page.locator('#c-to-kind').selectOption('agent');
  await page.locator('#c-to').fill('beta');
  await page.locator('#c-type').selectOption('task_assignment');
  await page.locator('#c-priority').selectOption('1');
  await page.locator('#c-content').fill(content);
  await page.locator('#c-send').click();
  await waitRows(page, 'the operator message in the log', (text) => [...document.querySelectorAll('#rows > li.msg')]
    .some((r) => r.querySelector('.content').textContent === text
      && r.querySelector('.from .agent-id').textContent === 'operator'
      && r.querySelector('.to').textContent === 'beta'
      && r.querySelector('.prio').textContent === 'high'), content);
  check(await page.locator('#c-content').inputValue() === '', 'the compose box is cleared after sending');
  request(`EXPECT beta ${content}`);
  step('composed a message to beta');
}

async function checkPresenceChange(page, missing) {
  if (missing.has('agents')) return;
  request('DISCONNECT beta');
  await waitRows(page, 'beta offline', () =>
    document.querySelector('#agents li.offline[data-agent="beta"]')
    && document.querySelector('#agents li.online[data-agent="alpha"]'));
  step('beta shown offline after it disconnected');
}

/**
 * File claims beside the agents (a held one, a pending one counting its objection window
 * down), and task states on their rows of the log, with the "open tasks" filter.
 */
async function checkCoordination(page) {
  await postJson(api('/claims'), { agent_id: 'alpha', paths: ['src/api/**'], reason: 'e2e refactor', ttl_ms: 1_800_000 });
  // Answered once its window closes: it is refused by an objection below.
  const pending = fetch(new URL(api('/claims'), baseUrl), {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ agent_id: 'beta', paths: ['docs/*.md'], objection_ms: 120_000 }),
  });
  await waitRows(page, 'the held claim and the pending one', () => {
    const held = document.querySelector('#claims li.claim.granted');
    const asked = document.querySelector('#claims li.claim.pending');
    return held && asked
      && held.textContent.includes('src/api/**') && held.textContent.includes('e2e refactor')
      && /expires in (29|30) min/.test(held.querySelector('.claim-when').textContent)
      && /objections close in \d+ (s|min)/.test(asked.querySelector('.claim-when').textContent);
  });
  const { body: held } = await getJson(api('/claims'));
  const beta = held.claims.find((c) => c.agent_id === 'beta');
  check(beta && beta.state === 'pending', 'the pending claim is listed by the API too');
  const objected = await postJson(api(`/claims/${beta.id}/objections`), { agent_id: 'alpha', reason: 'docs freeze' });
  check(objected.claim.state === 'objected', 'the objection refused the claim');
  const answered = await pending;
  check(answered.status === 409, `the pending claim's request answered ${answered.status} after the objection`);
  await waitRows(page, 'the objected claim to leave the panel', () => !document.querySelector('#claims li.claim.pending'));
  step('claims panel: held claims, a pending window counting down, gone once objected');

  const task = await postJson(api('/messages'), {
    sender_agent_id: 'alpha', sender_agent_type: 'planner', to_type: 'coder', type: 'task_assignment',
    content: 'e2e task: wire up component Z', task: true,
  });
  const tagOf = (id) => `#rows > li[data-id="${id}"] .task-tag`;
  await waitRows(page, 'the task open on its row', (sel) => {
    const tag = document.querySelector(sel);
    return tag && tag.textContent === 'task · open';
  }, tagOf(task.id));
  await page.locator('#f-open-tasks').check();
  await waitRows(page, 'the "open tasks" filter', (id) => {
    const shown = [...document.querySelectorAll('#rows > li.msg')].filter((r) => !r.hidden);
    return shown.length === 1 && shown[0].dataset.id === id;
  }, task.id);
  const claim = await fetch(new URL(api(`/tasks/${task.id}/claim`), baseUrl), {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ agent_id: 'beta' }),
  });
  check(claim.status === 200, `beta's claim of the task answered ${claim.status}`);
  await waitRows(page, 'the claimed task to leave the "open tasks" filter', () =>
    [...document.querySelectorAll('#rows > li.msg')].every((r) => r.hidden));
  await page.locator('#f-open-tasks').uncheck();
  await waitRows(page, 'the task claimed by beta', (sel) =>
    document.querySelector(sel).textContent === 'task · claimed by beta', tagOf(task.id));
  const done = await fetch(new URL(api(`/tasks/${task.id}/complete`), baseUrl), {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ agent_id: 'beta', result: 'Z is wired' }),
  });
  check(done.status === 200, `beta's completion answered ${done.status}`);
  await waitRows(page, 'the task done by beta', (sel) =>
    document.querySelector(sel).textContent === 'task · done by beta', tagOf(task.id));
  step('task states on their rows: open, claimed by beta, done by beta; the "open tasks" filter');
}

/** Dead letters and stats render, or say they are not available yet. */
async function checkOtherViews(page, missing) {
  for (const [view, noteId, bodySelector] of [
    ['dead-letters', 'dead-note', '#dead-rows'],
    ['stats', 'stats-note', '#stats-body'],
  ]) {
    await page.locator(`a[data-view="${view}"]`).click();
    check(page.url().endsWith(`#/p/${projectId}/${view}`), `the URL names the ${view} view`);
    const endpoint = view;
    await waitRows(page, `the ${view} view`, ([id, sel, absent]) => {
      const noteEl = document.getElementById(id);
      if (absent) return !noteEl.hidden && /not available yet/.test(noteEl.textContent);
      return document.querySelector(sel).childElementCount > 0 || (!noteEl.hidden && /^No /.test(noteEl.textContent));
    }, [noteId, bodySelector, missing.has(endpoint)]);
    if (missing.has(endpoint)) request(`SKIP ${view} content: GET /${endpoint} answers 404`);
  }
  step('dead letters and stats views render');
}

/** In a narrow window the panels stack and nothing overflows sideways. */
async function checkNarrowWindow(page) {
  await page.setViewportSize({ width: 420, height: 900 });
  const layout = await page.evaluate(() => {
    const log = document.getElementById('log').getBoundingClientRect();
    const agents = document.querySelector('.agents-col').getBoundingClientRect();
    return {
      overflow: document.documentElement.scrollWidth - window.innerWidth,
      stacked: agents.top >= log.bottom,
    };
  });
  check(layout.overflow <= 0, `no sideways scrolling in a narrow window (overflow ${layout.overflow}px)`);
  check(layout.stacked, 'the agents panel goes under the log in a narrow window');
  await page.screenshot({ path: path.join(artefactDir, 'console-narrow.png'), fullPage: true });
  step('narrow layout stacks');
}

main().catch((err) => {
  console.error(`console e2e FAILED: ${err.stack || err}`);
  process.exitCode = 1;
});
