package cliconfig

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"strings"

	"go.yaml.in/yaml/v3"
)

// FileError is a problem with one key of a config file. Its message names
// the key, the file and the line, and never a Go type: the reader wrote
// YAML, not Go.
type FileError struct {
	Path string // the file, as the user named it
	Line int    // 1-based line of the key; 0 when unknown
	Key  string // the key; a nested key is dotted (tls.cert)

	// Unknown is set when no tether command has Key. Suggestion is then
	// the nearest key, if one is near enough to be a typo, and
	// SuggestionElsewhere says it is a key of another command, not of
	// the one that read the file.
	Unknown             bool
	Suggestion          string
	SuggestionElsewhere bool

	// Problem says what is wrong with the value of a known key.
	Problem string
}

func (e *FileError) Error() string {
	where := "in " + e.Path
	if e.Line > 0 {
		where = fmt.Sprintf("in %s (line %d)", e.Path, e.Line)
	}
	if !e.Unknown {
		return fmt.Sprintf("key %q %s: %s", e.Key, where, e.Problem)
	}
	switch {
	case e.Suggestion != "" && e.SuggestionElsewhere:
		return fmt.Sprintf("unknown key %q %s: did you mean %q (a setting of another tether command)?", e.Key, where, e.Suggestion)
	case e.Suggestion != "":
		return fmt.Sprintf("unknown key %q %s: did you mean %q?", e.Key, where, e.Suggestion)
	default:
		return fmt.Sprintf("unknown key %q %s: no tether command has this setting (keys are the flag names, e.g. redis-prefix)", e.Key, where)
	}
}

// decodeFile decodes the YAML file at path into cfg, a pointer to a struct.
//
// It is strict about what it does not know and lenient about what belongs
// to another command: a top-level key that some other bound command has
// (see knownKeys) is ignored, so that one file can configure several
// commands; any other unknown key is an error with the nearest known key as
// a suggestion. Every problem in the file is reported at once, one per line.
// An empty value (`metrics:`) sets the setting to its empty value.
func decodeFile(path string, cfg any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read config file: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // an empty file is a valid, empty config
		}
		return fmt.Errorf("config file %s is not valid YAML: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return fmt.Errorf("config file %s holds more than one YAML document (a --- line): put every setting in one", path)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return nil
		}
		root = root.Content[0]
	}
	root = resolveAlias(root)
	if isNull(root) {
		return nil // only comments
	}
	if root.Kind != yaml.MappingNode {
		return fmt.Errorf("config file %s (line %d): want settings as \"key: value\" lines, found %s", path, root.Line, nodeKind(root))
	}
	d := &decoder{path: path}
	d.mapping(root, reflect.ValueOf(cfg).Elem(), "", true)
	return errors.Join(d.errs...)
}

// decoder collects every problem of one file.
type decoder struct {
	path string
	errs []error
}

func (d *decoder) fail(line int, key, problem string) {
	d.errs = append(d.errs, &FileError{Path: d.path, Line: line, Key: key, Problem: problem})
}

// mapping decodes the mapping node into the struct v. Only at the top
// level (top) are other commands' keys ignored: a nested struct belongs to
// this command alone.
func (d *decoder) mapping(node *yaml.Node, v reflect.Value, prefix string, top bool) {
	fields := map[string]int{}
	var own []string
	for i := 0; i < v.NumField(); i++ {
		if name, ok := fileKey(v.Type().Field(i)); ok {
			fields[name] = i
			own = append(own, name)
		}
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(node.Content); i += 2 {
		kn, vn := node.Content[i], node.Content[i+1]
		key := prefix + kn.Value
		if kn.Kind != yaml.ScalarNode || kn.Value == "<<" {
			d.fail(kn.Line, key, "a key must be a plain name (lists, mappings and merge keys are not keys)")
			continue
		}
		if first, dup := seen[kn.Value]; dup {
			d.fail(kn.Line, key, fmt.Sprintf("set twice (first on line %d)", first))
			continue
		}
		seen[kn.Value] = kn.Line
		idx, ok := fields[kn.Value]
		if !ok {
			if top && isKnownKey(kn.Value) {
				continue // another tether command's setting
			}
			d.errs = append(d.errs, d.unknown(kn, key, own, top))
			continue
		}
		d.value(vn, v.Field(idx), key, kn.Line)
	}
}

// unknown builds the error for a key no command has, suggesting this
// command's nearest key, else (at the top level) another command's.
func (d *decoder) unknown(kn *yaml.Node, key string, own []string, top bool) error {
	e := &FileError{Path: d.path, Line: kn.Line, Key: key, Unknown: true}
	if e.Suggestion = suggest(kn.Value, own); e.Suggestion != "" {
		e.Suggestion = strings.TrimSuffix(key, kn.Value) + e.Suggestion
		return e
	}
	if top {
		if e.Suggestion = suggest(kn.Value, allKnownKeys()); e.Suggestion != "" {
			e.SuggestionElsewhere = true
		}
	}
	return e
}

// value decodes one node into the field f.
func (d *decoder) value(vn *yaml.Node, f reflect.Value, key string, line int) {
	vn = resolveAlias(vn)
	if isNull(vn) {
		f.Set(reflect.Zero(f.Type()))
		return
	}
	switch {
	case f.Kind() == reflect.Struct:
		if vn.Kind != yaml.MappingNode {
			d.fail(line, key, fmt.Sprintf("want nested \"key: value\" settings, found %s", nodeKind(vn)))
			return
		}
		d.mapping(vn, f, key+".", false)
	case f.Kind() == reflect.Slice && f.Type().Elem().Kind() == reflect.String:
		switch vn.Kind {
		case yaml.ScalarNode:
			// One value, or a comma list as on the command line.
			if err := setFromString(f, vn.Value); err != nil {
				d.fail(line, key, err.Error())
			}
		case yaml.SequenceNode:
			list := make([]string, 0, len(vn.Content))
			for _, item := range vn.Content {
				item = resolveAlias(item)
				if item.Kind != yaml.ScalarNode {
					d.fail(item.Line, key, fmt.Sprintf("want a list of plain values, found %s in it", nodeKind(item)))
					return
				}
				list = append(list, item.Value)
			}
			f.Set(reflect.ValueOf(list))
		default:
			d.fail(line, key, fmt.Sprintf("want a list of values, found %s", nodeKind(vn)))
		}
	case isScalarKind(f):
		if vn.Kind != yaml.ScalarNode {
			d.fail(line, key, fmt.Sprintf("want a single value, found %s", nodeKind(vn)))
			return
		}
		if err := setFromString(f, vn.Value); err != nil {
			d.fail(line, key, err.Error())
		}
	default:
		// A type no tether config uses today: let YAML decode it.
		if err := vn.Decode(f.Addr().Interface()); err != nil {
			d.fail(line, key, strings.TrimPrefix(err.Error(), "yaml: "))
		}
	}
}

func isScalarKind(f reflect.Value) bool {
	switch f.Kind() {
	case reflect.String, reflect.Bool, reflect.Float32, reflect.Float64,
		reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return true
	}
	return false
}

func resolveAlias(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null"
}

// nodeKind names a node's shape for an error message.
func nodeKind(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "a list"
	case yaml.MappingNode:
		return "nested settings"
	case yaml.ScalarNode:
		return fmt.Sprintf("the single value %q", n.Value)
	default:
		return "something else"
	}
}
