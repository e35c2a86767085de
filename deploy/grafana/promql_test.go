// Package grafana_test checks the Grafana dashboard deploy/grafana/tether.json:
// every PromQL expression parses, and every metric and label it names is one
// the README's metrics catalogue lists (which cmd/tether/metrics_linux_test.go
// proves every daemon exports), used as its type allows (rate over counters,
// histogram_quantile over buckets).
package grafana_test

import (
	"fmt"
	"regexp"
	"strings"
	"unicode"
)

// The PromQL parser below covers the language the dashboard may use: vector
// selectors with matchers, range selectors and subqueries, offset, function
// calls from a known list, aggregations with by/without before or after the
// body, binary operators with bool, on/ignoring and group_left/group_right,
// numbers, strings and parentheses. Anything else is a parse error, so a
// query the test does not understand fails instead of passing unchecked.

type tokenKind int

const (
	tokEOF tokenKind = iota
	tokIdent
	tokNumber
	tokString
	tokDuration // inside [...]: 5m, 1h30m, $__rate_interval
	tokOp
	tokPunct // ( ) { } [ ] , :
)

type token struct {
	kind tokenKind
	text string
	pos  int
}

// lex splits expr into tokens. Inside square brackets words are durations.
func lex(expr string) ([]token, error) {
	var out []token
	inBrackets := false
	for i := 0; i < len(expr); {
		c := rune(expr[i])
		switch {
		case unicode.IsSpace(c):
			i++
		case c == '"' || c == '\'' || c == '`':
			j := i + 1
			for j < len(expr) && rune(expr[j]) != c {
				if expr[j] == '\\' && c != '`' {
					j++
				}
				j++
			}
			if j >= len(expr) {
				return nil, fmt.Errorf("unterminated string at %d", i)
			}
			out = append(out, token{tokString, expr[i+1 : j], i})
			i = j + 1
		case inBrackets && (unicode.IsDigit(c) || c == '$'):
			j := i
			for j < len(expr) && (unicode.IsLetter(rune(expr[j])) || unicode.IsDigit(rune(expr[j])) || expr[j] == '_' || expr[j] == '$') {
				j++
			}
			out = append(out, token{tokDuration, expr[i:j], i})
			i = j
		case unicode.IsDigit(c) || c == '.' && i+1 < len(expr) && unicode.IsDigit(rune(expr[i+1])):
			j := i
			for j < len(expr) && (unicode.IsDigit(rune(expr[j])) || expr[j] == '.' || expr[j] == 'e' || expr[j] == 'E') {
				j++
			}
			// A number with a unit (offset 1h, @ 5m) is a duration.
			if k := durationEnd(expr, i); k > j {
				out = append(out, token{tokDuration, expr[i:k], i})
				i = k
				continue
			}
			out = append(out, token{tokNumber, expr[i:j], i})
			i = j
		case unicode.IsLetter(c) || c == '_' || c == ':':
			if c == ':' && inBrackets {
				out = append(out, token{tokPunct, ":", i})
				i++
				continue
			}
			j := i
			for j < len(expr) && (unicode.IsLetter(rune(expr[j])) || unicode.IsDigit(rune(expr[j])) || expr[j] == '_' || expr[j] == ':') {
				j++
			}
			out = append(out, token{tokIdent, expr[i:j], i})
			i = j
		case strings.ContainsRune("(){}[],", c):
			if c == '[' {
				inBrackets = true
			}
			if c == ']' {
				inBrackets = false
			}
			out = append(out, token{tokPunct, string(c), i})
			i++
		default:
			matched := ""
			for _, op := range []string{"==", "!=", ">=", "<=", "=~", "!~", "+", "-", "*", "/", "%", "^", ">", "<", "="} {
				if strings.HasPrefix(expr[i:], op) {
					matched = op
					break
				}
			}
			if matched == "" {
				return nil, fmt.Errorf("unexpected %q at %d", c, i)
			}
			out = append(out, token{tokOp, matched, i})
			i += len(matched)
		}
	}
	return append(out, token{tokEOF, "", len(expr)}), nil
}

// durationPattern is a PromQL duration: 1h30m, 5m, 250ms.
var durationPattern = regexp.MustCompile(`^(?:[0-9]+(?:ms|[smhdwy]))+`)

// durationEnd returns where a duration starting at i ends, or i.
func durationEnd(expr string, i int) int {
	m := durationPattern.FindString(expr[i:])
	if m == "" || i+len(m) < len(expr) && (unicode.IsLetter(rune(expr[i+len(m)])) || expr[i+len(m)] == '_') {
		return i
	}
	return i + len(m)
}

// selector is one metric a query reads.
type selector struct {
	metric   string
	labels   []string // label names of its matchers
	inRange  string   // the range function applied to it, if any (rate, increase, ...)
	position int
}

// query is what an expression refers to.
type query struct {
	selectors []selector
	grouping  []string // labels of by/without/on/ignoring/group_x
	functions []string
}

var aggregations = map[string]bool{"sum": true, "min": true, "max": true, "avg": true, "count": true,
	"stddev": true, "stdvar": true, "topk": true, "bottomk": true, "quantile": true, "count_values": true, "group": true}

// rangeFunctions take a range vector. counterFunctions among them only make
// sense on counters.
var rangeFunctions = map[string]bool{"rate": true, "irate": true, "increase": true, "delta": true, "idelta": true,
	"deriv": true, "changes": true, "resets": true, "max_over_time": true, "min_over_time": true, "avg_over_time": true,
	"sum_over_time": true, "count_over_time": true, "last_over_time": true, "quantile_over_time": true, "predict_linear": true}
var counterFunctions = map[string]bool{"rate": true, "irate": true, "increase": true, "resets": true}

var instantFunctions = map[string]bool{"abs": true, "absent": true, "ceil": true, "floor": true, "round": true,
	"clamp": true, "clamp_min": true, "clamp_max": true, "time": true, "timestamp": true, "vector": true, "scalar": true,
	"label_replace": true, "label_join": true, "sort": true, "sort_desc": true, "histogram_quantile": true, "sqrt": true,
	"ln": true, "exp": true, "log2": true, "log10": true}

var keywords = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true,
	"group_right": true, "bool": true, "and": true, "or": true, "unless": true, "offset": true}

type parser struct {
	toks []token
	i    int
	q    query
	// rangeFn is the innermost range function being parsed, so that the
	// selector inside it records what it is rated by.
	rangeFn string
}

func (p *parser) peek() token { return p.toks[p.i] }
func (p *parser) next() token { t := p.toks[p.i]; p.i++; return t }

func (p *parser) expect(text string) error {
	t := p.next()
	if t.text != text || t.kind == tokString {
		return fmt.Errorf("at %d: want %q, got %q", t.pos, text, t.text)
	}
	return nil
}

// parsePromQL parses expr and returns what it refers to.
func parsePromQL(expr string) (query, error) {
	toks, err := lex(expr)
	if err != nil {
		return query{}, err
	}
	p := &parser{toks: toks}
	if err := p.expr(); err != nil {
		return query{}, err
	}
	if t := p.peek(); t.kind != tokEOF {
		return query{}, fmt.Errorf("at %d: unexpected %q after the expression", t.pos, t.text)
	}
	return p.q, nil
}

func isBinaryOp(t token) bool {
	if t.kind == tokOp {
		return t.text != "=" && t.text != "=~" && t.text != "!~"
	}
	return t.kind == tokIdent && (t.text == "and" || t.text == "or" || t.text == "unless")
}

func (p *parser) expr() error {
	if err := p.unary(); err != nil {
		return err
	}
	for isBinaryOp(p.peek()) {
		p.next()
		if p.peek().text == "bool" {
			p.next()
		}
		if t := p.peek(); t.text == "on" || t.text == "ignoring" {
			p.next()
			if _, err := p.labelList(); err != nil {
				return err
			}
			if t := p.peek(); t.text == "group_left" || t.text == "group_right" {
				p.next()
				if p.peek().text == "(" {
					if _, err := p.labelList(); err != nil {
						return err
					}
				}
			}
		}
		if err := p.unary(); err != nil {
			return err
		}
	}
	return nil
}

func (p *parser) unary() error {
	if t := p.peek(); t.kind == tokOp && (t.text == "-" || t.text == "+") {
		p.next()
	}
	if err := p.primary(); err != nil {
		return err
	}
	// Range, subquery and offset apply to what precedes them.
	if p.peek().text == "[" {
		if err := p.rangeSuffix(); err != nil {
			return err
		}
	}
	if p.peek().text == "offset" {
		p.next()
		if t := p.next(); t.kind != tokDuration {
			return fmt.Errorf("at %d: offset needs a duration", t.pos)
		}
	}
	return nil
}

func (p *parser) rangeSuffix() error {
	p.next() // [
	if t := p.next(); t.kind != tokDuration {
		return fmt.Errorf("at %d: want a duration in [...], got %q", t.pos, t.text)
	}
	if p.peek().text == ":" {
		p.next()
		if p.peek().kind == tokDuration {
			p.next()
		}
	}
	return p.expect("]")
}

func (p *parser) labelList() ([]string, error) {
	if err := p.expect("("); err != nil {
		return nil, err
	}
	var out []string
	for p.peek().text != ")" {
		t := p.next()
		if t.kind != tokIdent {
			return nil, fmt.Errorf("at %d: want a label name, got %q", t.pos, t.text)
		}
		out = append(out, t.text)
		p.q.grouping = append(p.q.grouping, t.text)
		if p.peek().text == "," {
			p.next()
		}
	}
	p.next()
	return out, nil
}

func (p *parser) primary() error {
	t := p.peek()
	switch {
	case t.kind == tokNumber || t.kind == tokString:
		p.next()
		return nil
	case t.text == "(" && t.kind == tokPunct:
		p.next()
		if err := p.expr(); err != nil {
			return err
		}
		return p.expect(")")
	case t.text == "{" && t.kind == tokPunct:
		return p.selector("")
	case t.kind == tokIdent && aggregations[t.text]:
		return p.aggregation()
	case t.kind == tokIdent && (rangeFunctions[t.text] || instantFunctions[t.text]):
		return p.call()
	case t.kind == tokIdent && keywords[t.text]:
		return fmt.Errorf("at %d: unexpected keyword %q", t.pos, t.text)
	case t.kind == tokIdent:
		p.next()
		if p.peek().text == "(" {
			return fmt.Errorf("at %d: unknown function %q", t.pos, t.text)
		}
		p.i--
		return p.selector(t.text)
	}
	return fmt.Errorf("at %d: unexpected %q", t.pos, t.text)
}

func (p *parser) aggregation() error {
	op := p.next()
	p.q.functions = append(p.q.functions, op.text)
	if t := p.peek(); t.text == "by" || t.text == "without" {
		p.next()
		if _, err := p.labelList(); err != nil {
			return err
		}
	}
	if err := p.expect("("); err != nil {
		return err
	}
	if err := p.expr(); err != nil {
		return err
	}
	if p.peek().text == "," { // topk(5, x), quantile(0.9, x), count_values("l", x)
		p.next()
		if err := p.expr(); err != nil {
			return err
		}
	}
	if err := p.expect(")"); err != nil {
		return err
	}
	if t := p.peek(); t.text == "by" || t.text == "without" {
		p.next()
		if _, err := p.labelList(); err != nil {
			return err
		}
	}
	return nil
}

func (p *parser) call() error {
	fn := p.next()
	p.q.functions = append(p.q.functions, fn.text)
	if err := p.expect("("); err != nil {
		return err
	}
	outer := p.rangeFn
	if rangeFunctions[fn.text] {
		p.rangeFn = fn.text
	}
	defer func() { p.rangeFn = outer }()
	for p.peek().text != ")" {
		if err := p.expr(); err != nil {
			return err
		}
		if p.peek().text == "," {
			p.next()
		} else if p.peek().text != ")" {
			return fmt.Errorf("at %d: want , or ) in %s(...), got %q", p.peek().pos, fn.text, p.peek().text)
		}
	}
	p.next()
	return nil
}

func (p *parser) selector(metric string) error {
	start := p.peek().pos
	if metric != "" {
		p.next()
	}
	sel := selector{metric: metric, inRange: p.rangeFn, position: start}
	if p.peek().text == "{" {
		p.next()
		for p.peek().text != "}" {
			name := p.next()
			if name.kind != tokIdent {
				return fmt.Errorf("at %d: want a label name in {...}, got %q", name.pos, name.text)
			}
			op := p.next()
			if op.kind != tokOp || (op.text != "=" && op.text != "!=" && op.text != "=~" && op.text != "!~") {
				return fmt.Errorf("at %d: want a matcher operator after %s, got %q", op.pos, name.text, op.text)
			}
			if v := p.next(); v.kind != tokString {
				return fmt.Errorf("at %d: want a quoted value after %s%s", v.pos, name.text, op.text)
			}
			if name.text == "__name__" {
				return fmt.Errorf("at %d: __name__ matchers hide which metric is read; name it", name.pos)
			}
			sel.labels = append(sel.labels, name.text)
			if p.peek().text == "," {
				p.next()
			}
		}
		p.next()
	}
	if sel.metric == "" {
		return fmt.Errorf("at %d: a selector without a metric name", start)
	}
	p.q.selectors = append(p.q.selectors, sel)
	return nil
}
