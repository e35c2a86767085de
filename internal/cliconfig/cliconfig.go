// Package cliconfig owns how a daemon's typed configuration struct is filled
// from its defaults, a strict YAML file, the environment and command-line
// flags, in that order of precedence (later wins).
//
// A config struct marks each user-facing field with a `yaml` tag and, where it
// should also be a flag, a `flag` tag and a `usage` tag:
//
//	type Config struct {
//		Listen string        `yaml:"listen" flag:"listen" usage:"address to accept tunnels on"`
//		Lease  time.Duration `yaml:"lease"  flag:"lease"  usage:"route lease"`
//	}
//
// Bind registers the flags with the struct's current (default) values; after
// cobra has parsed the command line, Resolve layers the file and the
// environment underneath the flags the user actually set. The environment
// variable for flag "tls-cert" is TETHER_TLS_CERT.
//
// One file may carry the settings of several commands (a host that runs a
// PS and a redirector can share "redis" and "redis-prefix"): Bind remembers
// the file keys of every config it binds, and a command ignores the keys it
// lacks that another command has. Keys mean the same to every command that
// has them.
package cliconfig

import (
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// EnvPrefix prefixes every environment variable that mirrors a flag.
const EnvPrefix = "TETHER_"

var durationType = reflect.TypeOf(time.Duration(0))

// Bind registers one flag on fs for every field of *cfg that carries a `flag`
// tag. The flag writes straight into the field; its default is the field's
// value at the time of the call, so call Bind on a DefaultConfig().
// Bind also remembers the struct's file keys as keys of this program (see
// Resolve). It panics on an unsupported field type: that is a programming error.
func Bind(fs *pflag.FlagSet, cfg any) {
	v := reflect.ValueOf(cfg)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		panic("cliconfig.Bind: cfg must be a pointer to a struct")
	}
	rememberKeys(v.Elem().Type())
	eachFlagField(v.Elem(), func(name, usage string, f reflect.Value) {
		p := f.Addr().Interface()
		switch ptr := p.(type) {
		case *string:
			fs.StringVar(ptr, name, *ptr, usage)
		case *bool:
			fs.BoolVar(ptr, name, *ptr, usage)
		case *int:
			fs.IntVar(ptr, name, *ptr, usage)
		case *uint16:
			fs.Uint16Var(ptr, name, *ptr, usage)
		case *float64:
			fs.Float64Var(ptr, name, *ptr, usage)
		case *time.Duration:
			fs.DurationVar(ptr, name, *ptr, usage)
		case *[]string:
			fs.StringSliceVar(ptr, name, *ptr, usage)
		default:
			panic(fmt.Sprintf("cliconfig.Bind: flag %q has unsupported type %s", name, f.Type()))
		}
	})
}

// Resolve turns *cfg, which Bind filled with defaults and the parsed flags,
// into the effective configuration: defaults, then the YAML file at path (if
// path is not empty), then TETHER_* environment variables, then the flags
// the user set on the command line.
//
// A file key that belongs to another command bound in this process is
// ignored, so one file may serve several commands; a key no command has is
// an error naming the file, the line and the nearest known key (see
// FileError).
func Resolve(fs *pflag.FlagSet, path string, cfg any) error {
	v := reflect.ValueOf(cfg).Elem()
	fromFlags := reflect.New(v.Type()).Elem()
	fromFlags.Set(v)

	// Unchanged flags still hold their defaults, so v is "defaults + flags";
	// the file and the environment go on top of it, then the changed flags are
	// put back on top of everything.
	if path != "" {
		if err := decodeFile(path, cfg); err != nil {
			return err
		}
	}
	var envErr error
	eachFlagField(v, func(name, _ string, f reflect.Value) {
		if envErr != nil {
			return
		}
		if fl := fs.Lookup(name); fl != nil && fl.Changed {
			return
		}
		key := EnvPrefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
		raw, ok := os.LookupEnv(key)
		if !ok {
			return
		}
		if err := setFromString(f, raw); err != nil {
			envErr = fmt.Errorf("environment variable %s: %w", key, err)
		}
	})
	if envErr != nil {
		return envErr
	}
	eachFlagField(fromFlags, func(name, _ string, f reflect.Value) {
		if fl := fs.Lookup(name); fl != nil && fl.Changed {
			fieldByFlag(v, name).Set(f)
		}
	})
	return nil
}

func eachFlagField(v reflect.Value, fn func(name, usage string, f reflect.Value)) {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		sf := t.Field(i)
		name := sf.Tag.Get("flag")
		if name == "" || !sf.IsExported() {
			continue
		}
		fn(name, sf.Tag.Get("usage"), v.Field(i))
	}
}

func fieldByFlag(v reflect.Value, name string) reflect.Value {
	var out reflect.Value
	eachFlagField(v, func(n, _ string, f reflect.Value) {
		if n == name {
			out = f
		}
	})
	return out
}

// setFromString parses raw, a flag-style value from the environment or a
// config file, into f. Its errors say what was expected in the reader's
// terms (a duration, a whole number), never a Go type.
func setFromString(f reflect.Value, raw string) error {
	switch {
	case f.Type() == durationType:
		d, err := time.ParseDuration(raw)
		if err != nil {
			return fmt.Errorf("%q is not a duration (want e.g. 500ms, 5s or 1m30s)", raw)
		}
		f.SetInt(int64(d))
	case f.Kind() == reflect.String:
		f.SetString(raw)
	case f.Kind() == reflect.Bool:
		b, err := strconv.ParseBool(raw)
		if err != nil {
			return fmt.Errorf("%q is not true or false", raw)
		}
		f.SetBool(b)
	case f.CanInt():
		n, err := strconv.ParseInt(raw, 10, f.Type().Bits())
		if err != nil {
			return fmt.Errorf("%q is not a whole number", raw)
		}
		f.SetInt(n)
	case f.CanUint():
		n, err := strconv.ParseUint(raw, 10, f.Type().Bits())
		if err != nil {
			return fmt.Errorf("%q is not a whole number from 0 to %d", raw, uint64(1)<<f.Type().Bits()-1)
		}
		f.SetUint(n)
	case f.CanFloat():
		x, err := strconv.ParseFloat(raw, f.Type().Bits())
		if err != nil {
			return fmt.Errorf("%q is not a number", raw)
		}
		f.SetFloat(x)
	case f.Kind() == reflect.Slice && f.Type().Elem().Kind() == reflect.String:
		var parts []string
		for _, p := range strings.Split(raw, ",") {
			if p = strings.TrimSpace(p); p != "" {
				parts = append(parts, p)
			}
		}
		f.Set(reflect.ValueOf(parts))
	default:
		return fmt.Errorf("cannot be set from text (a setting of type %s)", f.Type())
	}
	return nil
}

// TokenEnv is the environment variable holding the tunnel token when no
// token file is given (a token is never a flag value).
const TokenEnv = "TETHER_TOKEN"

// ReadSecret reads a secret such as a token: from the file at path when path
// is set, otherwise from the environment variable env. Surrounding white
// space is trimmed. An empty result is not an error: the caller decides
// whether the secret is required.
func ReadSecret(path, env string) (string, error) {
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("read secret: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
	return strings.TrimSpace(os.Getenv(env)), nil
}
