package registry

import (
	"reflect"
	"testing"
)

// entrySamples are route entries as the registry's scripts write them
// (cjson, keys in any order, "/" escaped) and as nothing should: every one
// must read the same through parseEntry's hand scanner as through
// encoding/json (decodeEntry).
var entrySamples = []string{
	// Written by the scripts.
	`{"port":20001,"agent_id":"a1"}`,
	`{"agent_id":"a1","port":20001}`,
	`{"port":20001,"agent_id":"agent-7","owner":"tok:3f2a9c1b","addr":"127.0.0.2"}`,
	`{"addr":"fd00::1","owner":"cert:a1","agent_id":"x","port":65535}`,
	`{"port":1,"agent_id":"a","lost":true}`,
	`{"port":1,"agent_id":"a","lost":false}`,
	` { "port" : 7 ,	"agent_id" : "sp ace"
	} `,
	// Valid JSON the scanner leaves to encoding/json.
	`{"port":1,"agent_id":"a","owner":"tok:a\/b"}`,
	`{"port":1,"agent_id":"caf\u00e9"}`,
	`{"port":1,"agent_id":"café"}`,
	`{"Port":1,"agent_id":"a"}`,
	`{"port":1,"agent_id":"a","extra":2}`,
	`{"port":1,"agent_id":"a","owner":null}`,
	`{"port":1.0,"agent_id":"a"}`,
	`{"port":1e3,"agent_id":"a"}`,
	`{"port":1,"agent_id":"a","lost":"true"}`,
	`{"port":1,"port":2,"agent_id":"a"}`,
	`{}`,
	// Entries decodeEntry refuses: the scanner must not accept them either.
	`{"port":0,"agent_id":"a"}`,
	`{"port":1}`,
	`{"port":1,"agent_id":""}`,
	`{"port":65536,"agent_id":"a"}`,
	`{"port":-1,"agent_id":"a"}`,
	`{"port":01,"agent_id":"a"}`,
	`{"port":1,"agent_id":"a"} x`,
	`{"port":1,"agent_id":"a",}`,
	`{"port":1,"agent_id":"a"`,
	`{"port":1,"agent_id":"a\u0000"}`,
	`{"port":1,"agent_id":"a` + "\x01" + `"}`,
	`{"port":1,"agent_id":"a` + "\xff" + `"}`,
	`["port",1]`,
	``,
	`null`,
}

func TestParseEntryReadsAsEncodingJSON(t *testing.T) {
	for _, raw := range entrySamples {
		checkParseEntry(t, raw)
	}
}

// The scanner takes the entries the scripts write, and only those it reads
// exactly: were it to refuse them all, parseEntry would still be right, and
// as slow as before.
func TestScanEntryTakesTheScriptsEntriesOnly(t *testing.T) {
	for _, raw := range entrySamples[:7] {
		if _, ok := scanEntry(raw); !ok {
			t.Errorf("scanEntry refused %q, an entry as the scripts write it", raw)
		}
	}
	for _, raw := range []string{
		`{"port":1,"agent_id":"a","owner":"tok:a\/b"}`, // an escape
		`{"port":1,"agent_id":"café"}`,                 // non-ASCII (encoding/json checks UTF-8)
		`{"Port":1,"agent_id":"a"}`,                    // encoding/json matches keys case-insensitively
		`{"port":1,"agent_id":"a","owner":null}`,
		`{"port":1e3,"agent_id":"a"}`,
	} {
		if _, ok := scanEntry(raw); ok {
			t.Errorf("scanEntry accepted %q, which it must leave to encoding/json", raw)
		}
	}
}

func FuzzParseEntry(f *testing.F) {
	for _, raw := range entrySamples {
		f.Add(raw)
	}
	f.Fuzz(checkParseEntry)
}

func checkParseEntry(t *testing.T, raw string) {
	want, wantErr := decodeEntry(raw)
	got, err := parseEntry(raw)
	if (err != nil) != (wantErr != nil) {
		t.Fatalf("%q: parseEntry error %v, decodeEntry error %v", raw, err, wantErr)
	}
	if err == nil && !reflect.DeepEqual(got, want) {
		t.Fatalf("%q: parseEntry read %+v, decodeEntry %+v", raw, got, want)
	}
}
