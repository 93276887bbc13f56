import { describe, expect, it } from 'vitest';
import { DmError } from '../../src/core/errors.ts';
import { describeEndpoint, isNbdUri, parseNbdUri } from '../../src/nbd/client-uri.ts';

/** parse, expect a DmError EINVAL naming the URI, return its message */
function failure(uri: string): string {
  try {
    parseNbdUri(uri);
  } catch (err) {
    expect(err).toBeInstanceOf(DmError);
    expect((err as DmError).code).toBe('EINVAL');
    expect((err as Error).message).toContain(`'${uri}'`);
    return (err as Error).message;
  }
  throw new Error(`expected ${uri} to be refused`);
}

describe('parseNbdUri: TCP', () => {
  it('reads host, default port and the default export', () => {
    const u = parseNbdUri('nbd://example.com');
    expect(u).toEqual({
      uri: 'nbd://example.com', scheme: 'nbd', tls: false, exportName: '',
      endpoint: { kind: 'tcp', host: 'example.com', port: 10809 },
    });
    expect(parseNbdUri('nbd://example.com/').exportName).toBe('');
  });

  it('reads an explicit port and an export name', () => {
    const u = parseNbdUri('nbd://10.0.0.1:1234/disk0');
    expect(u.endpoint).toEqual({ kind: 'tcp', host: '10.0.0.1', port: 1234 });
    expect(u.exportName).toBe('disk0');
  });

  it('keeps a second slash as part of the export name', () => {
    expect(parseNbdUri('nbd://h//disk').exportName).toBe('/disk');
    expect(parseNbdUri('nbd://h/a/b').exportName).toBe('a/b');
  });

  it('percent-decodes the export name', () => {
    expect(parseNbdUri('nbd://h/my%20disk%2Fx').exportName).toBe('my disk/x');
    expect(parseNbdUri('nbd://h/%C3%A9t%C3%A9').exportName).toBe('été');
  });

  it('accepts bracketed IPv6 hosts', () => {
    expect(parseNbdUri('nbd://[::1]:10810/e').endpoint).toEqual({ kind: 'tcp', host: '::1', port: 10810 });
    expect(parseNbdUri('nbd://[fe80::1]/').endpoint).toEqual({ kind: 'tcp', host: 'fe80::1', port: 10809 });
  });

  it('is case-insensitive in the scheme', () => {
    expect(parseNbdUri('NBD://h/x').scheme).toBe('nbd');
  });

  it('reads nbds with user and PSK file', () => {
    const u = parseNbdUri('nbds://alice@h:7000/e?tls-psk-file=/etc/keys.psk');
    expect(u.tls).toBe(true);
    expect(u.user).toBe('alice');
    expect(u.pskFile).toBe('/etc/keys.psk');
    expect(u.endpoint).toEqual({ kind: 'tcp', host: 'h', port: 7000 });
  });
});

describe('parseNbdUri: Unix sockets', () => {
  it('reads the socket path and export', () => {
    const u = parseNbdUri('nbd+unix:///disk?socket=/run/nbd.sock');
    expect(u.endpoint).toEqual({ kind: 'unix', path: '/run/nbd.sock' });
    expect(u.exportName).toBe('disk');
    expect(u.tls).toBe(false);
    expect(parseNbdUri('nbd+unix:///?socket=/tmp/x').exportName).toBe('');
    expect(parseNbdUri('nbd+unix://?socket=/tmp/x').exportName).toBe('');
  });

  it('percent-decodes query values without turning + into a space', () => {
    const u = parseNbdUri('nbd+unix:///e?socket=/tmp/a%20b+c%26d.sock');
    expect(u.endpoint).toEqual({ kind: 'unix', path: '/tmp/a b+c&d.sock' });
  });

  it('reads nbds+unix with user, socket and PSK file in any order', () => {
    const u = parseNbdUri('nbds+unix://alice@/exp?tls-psk-file=/k.psk&socket=/s.sock');
    expect(u).toMatchObject({ scheme: 'nbds+unix', tls: true, user: 'alice', pskFile: '/k.psk', exportName: 'exp' });
    expect(u.endpoint).toEqual({ kind: 'unix', path: '/s.sock' });
  });

  it('keeps the URI as given', () => {
    const s = 'nbd+unix:///x?socket=/a';
    expect(parseNbdUri(s).uri).toBe(s);
  });
});

describe('parseNbdUri: malformed URIs', () => {
  it('names the problem for each', () => {
    expect(failure('/dev/sda')).toMatch(/not a URI/);
    expect(failure('nbd:/host/x')).toMatch(/expected '\/\/'/);
    expect(failure('http://h/x')).toMatch(/not an NBD scheme/);
    expect(failure('nbd+vsock://2/x')).toMatch(/unsupported scheme 'nbd\+vsock'/);
    expect(failure('nbd:///x')).toMatch(/missing host/);
    expect(failure('nbd://h:0/x')).toMatch(/invalid port '0'/);
    expect(failure('nbd://h:65536/x')).toMatch(/invalid port/);
    expect(failure('nbd://h:port/x')).toMatch(/invalid port 'port'/);
    expect(failure('nbd://::1/x')).toMatch(/IPv6 addresses must be in brackets/);
    expect(failure('nbd://[::1/x')).toMatch(/unterminated/);
    expect(failure('nbd://h/x#frag')).toMatch(/fragments/);
    expect(failure('nbd://h/%zz')).toMatch(/percent-encoding in export name/);
    expect(failure('nbd://h/x?socket=/s')).toMatch(/'socket=' is only valid with nbd\+unix/);
    expect(failure('nbd://h/x?foo=1')).toMatch(/unknown query parameter 'foo'.*takes no query parameters/);
    expect(failure('nbd://h/x?tls-psk-file=/k')).toMatch(/needs TLS \(use nbds:\/\/\)/);
    expect(failure('nbd://alice@h/x')).toMatch(/user name is only meaningful with TLS/);
    expect(failure('nbds://a:pw@h/x')).toMatch(/passwords/);
    expect(failure('nbds://h/x?tls-certificates=/d')).toMatch(/'tls-certificates' is not supported/);
  });

  it('refuses Unix URIs without a socket, with a host, or with bad queries', () => {
    expect(failure('nbd+unix:///x')).toMatch(/missing '\?socket=PATH'/);
    expect(failure('nbd+unix:///x?socket=')).toMatch(/missing '\?socket=PATH'/);
    expect(failure('nbd+unix://host/x?socket=/s')).toMatch(/has no host \('host'\)/);
    expect(failure('nbd+unix:///x?socket=/a&socket=/b')).toMatch(/given twice/);
    expect(failure('nbd+unix:///x?socket')).toMatch(/has no value/);
    expect(failure('nbd+unix:///x?socket=/s&bar=1')).toMatch(/unknown query parameter 'bar' \(expected socket\)/);
    expect(failure('nbd+unix:///x?socket=%')).toMatch(/percent-encoding in query parameter 'socket'/);
    expect(failure('nbds+unix:///x?socket=/s&tls-psk-file=')).toMatch(/empty 'tls-psk-file='/);
  });

  it('refuses over-long export names and NUL', () => {
    expect(failure(`nbd://h/${'a'.repeat(4097)}`)).toMatch(/longer than 4096 bytes/);
    expect(failure('nbd://h/a%00b')).toMatch(/NUL/);
  });
});

describe('isNbdUri and describeEndpoint', () => {
  it('recognises the four schemes only', () => {
    for (const s of ['nbd://h', 'nbds://h', 'nbd+unix:///?socket=/s', 'NBDS+UNIX:///?socket=/s']) expect(isNbdUri(s)).toBe(true);
    for (const s of ['/dev/sda', 'dm:vol', 'nbd+vsock://1', 'http://h', 'image.img', 'nbdx://h']) expect(isNbdUri(s)).toBe(false);
  });

  it('prints host:port, [v6]:port or the socket path', () => {
    expect(describeEndpoint({ kind: 'tcp', host: 'h', port: 1 })).toBe('h:1');
    expect(describeEndpoint({ kind: 'tcp', host: '::1', port: 2 })).toBe('[::1]:2');
    expect(describeEndpoint({ kind: 'unix', path: '/s' })).toBe('/s');
  });
});
