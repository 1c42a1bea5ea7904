/**
 * The README's complete example, taken from the README itself and run as a program against a
 * real broker: it must work as printed there and print what the README says it prints.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { Broker } from './helpers.js';

const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** The fenced blocks of the README section `heading`, in order. */
function blocks(heading: string): string[] {
  const readme = readFileSync(path.join(PACKAGE_DIR, 'README.md'), 'utf8');
  const start = readme.indexOf(`\n## ${heading}\n`);
  assert.ok(start >= 0, `the README has a section "${heading}"`);
  const end = readme.indexOf('\n## ', start + 1);
  const section = readme.slice(start, end < 0 ? undefined : end);
  return [...section.matchAll(/```[a-z]*\n([\s\S]*?)```/g)].map((m) => m[1]!);
}

test('the README example runs and prints what the README shows', async (t) => {
  const [program, output] = blocks('A complete example');
  assert.ok(program && output, 'the section has the program and its output');
  // Inside the package, so that `@agentbus/client` resolves to this package (self-reference).
  const file = path.join(PACKAGE_DIR, 'build', 'test', 'readme-example.mjs');
  writeFileSync(file, program);

  const broker = await Broker.start(t);
  const projectId = await broker.createProject('demo');
  const { stdout } = await promisify(execFile)(process.execPath, [file], {
    cwd: PACKAGE_DIR,
    env: { ...process.env, AGENTBUS_URL: broker.url, AGENTBUS_PROJECT: projectId },
    timeout: 60_000,
  });
  const printed = stdout.trim().split('\n');
  const expected = output.trim().split('\n');
  // The observer prints as messages arrive; its line for the reply can come after the close.
  const optional = expected.filter((line) => line.startsWith('#3 '));
  for (const line of expected) {
    if (!optional.includes(line)) assert.ok(printed.includes(line), `printed ${JSON.stringify(line)}:\n${stdout}`);
  }
  for (const line of printed) assert.ok(expected.includes(line), `unexpected line ${JSON.stringify(line)}`);
  const { messages } = await broker.rest(projectId).history();
  assert.deepEqual(
    messages.map((m) => [m.seq, m.sender_agent_id, m.message_type]),
    [
      [1, 'coder-1', 'coordination'],
      [2, 'coder-1', 'request'],
      [3, 'reviewer-1', 'response'],
    ],
  );
});
