// The WASI imports of the `keeper-core` world. Random, the monotonic clock
// and wasi:io come from @bytecodealliance/preview2-shim; wasi:cli is this
// host's own, as the WIT asks of a host: no arguments, no environment (the
// process's environment holds client secrets), no working directory, a
// closed standard input, discarding standard output and error (the CLI's
// standard output carries the access token and nothing else), and an `exit`
// that traps instead of ending the process.

import { monotonicClock } from '@bytecodealliance/preview2-shim/clocks';
import { error, poll, streams } from '@bytecodealliance/preview2-shim/io';
import { random } from '@bytecodealliance/preview2-shim/random';
import { terminalInput, terminalOutput } from '@bytecodealliance/preview2-shim/cli';

const { InputStream, OutputStream } = streams;
const dispose = Symbol.dispose ?? Symbol.for('dispose');

/** An output stream that takes everything and keeps nothing. */
class DiscardingOutput extends OutputStream {
  checkWrite() {
    return 1n << 20n;
  }
  write() {}
  blockingWriteAndFlush() {}
  flush() {}
  blockingFlush() {}
  writeZeroes() {}
  blockingWriteZeroesAndFlush() {}
  splice() {
    return 0n;
  }
  blockingSplice() {
    return 0n;
  }
  subscribe() {
    return monotonicClock.subscribeDuration(0n);
  }
  [dispose]() {}
}

/** An input stream at its end. */
class ClosedInput extends InputStream {
  read() {
    throw { tag: 'closed' };
  }
  blockingRead() {
    throw { tag: 'closed' };
  }
  skip() {
    throw { tag: 'closed' };
  }
  blockingSkip() {
    throw { tag: 'closed' };
  }
  subscribe() {
    return monotonicClock.subscribeDuration(0n);
  }
  [dispose]() {}
}

/** The WASI part of one instance's imports (fresh streams per instance). */
export function wasiImports() {
  const stdin = new ClosedInput();
  const stdout = new DiscardingOutput();
  const stderr = new DiscardingOutput();
  const cli = {
    environment: {
      getEnvironment: () => [],
      getArguments: () => [],
      initialCwd: () => undefined,
    },
    exit: {
      exit() {
        throw new Error('the component called exit');
      },
      exitWithCode() {
        throw new Error('the component called exit');
      },
    },
    stdin: { getStdin: () => stdin },
    stdout: { getStdout: () => stdout },
    stderr: { getStderr: () => stderr },
    terminalInput,
    terminalOutput,
    terminalStdin: { getTerminalStdin: () => undefined },
    terminalStdout: { getTerminalStdout: () => undefined },
    terminalStderr: { getTerminalStderr: () => undefined },
  };
  return {
    'wasi:random/random': random,
    'wasi:clocks/monotonic-clock': monotonicClock,
    'wasi:io/error': error,
    'wasi:io/poll': poll,
    'wasi:io/streams': streams,
    'wasi:cli/environment': cli.environment,
    'wasi:cli/exit': cli.exit,
    'wasi:cli/stdin': cli.stdin,
    'wasi:cli/stdout': cli.stdout,
    'wasi:cli/stderr': cli.stderr,
    'wasi:cli/terminal-input': cli.terminalInput,
    'wasi:cli/terminal-output': cli.terminalOutput,
    'wasi:cli/terminal-stdin': cli.terminalStdin,
    'wasi:cli/terminal-stdout': cli.terminalStdout,
    'wasi:cli/terminal-stderr': cli.terminalStderr,
  };
}
