package transcode

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"net/url"
	"strconv"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// PrintOptions shape the JSON answers (Envoy's print_options).
type PrintOptions struct {
	ProtoFieldNames bool // preserve_proto_field_names
	EmitDefaults    bool // always_print_primitive_fields
	EnumsAsInts     bool // always_print_enums_as_ints
}

// Codec turns REST requests into request messages and response messages into JSON for one Set.
type Codec struct {
	Set     *Set
	marshal protojson.MarshalOptions
	parse   protojson.UnmarshalOptions
}

// NewCodec is the codec of set with the print options.
func NewCodec(set *Set, p PrintOptions) *Codec {
	return &Codec{
		Set: set,
		marshal: protojson.MarshalOptions{
			UseProtoNames:     p.ProtoFieldNames,
			EmitDefaultValues: p.EmitDefaults,
			UseEnumNumbers:    p.EnumsAsInts,
			Resolver:          set.Types,
		},
		// Envoy's JSON parser skips fields the message does not have.
		parse: protojson.UnmarshalOptions{DiscardUnknown: true, Resolver: set.Types},
	}
}

// RequestError is a request the client got wrong (HTTP 400).
type RequestError struct{ msg string }

func (e *RequestError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &RequestError{fmt.Sprintf(format, args...)}
}

// Request builds the request message of binding b from its path variables' values, the raw
// query and the body, and returns it serialized. Path and query fields are set first and the
// body merged over them, as Envoy's transcoder does (a body field wins over the same field in the
// path); query parameters naming no field are ignored (ignore_unknown_query_parameters).
func (c *Codec) Request(b *Binding, vars []string, rawQuery string, body []byte) ([]byte, error) {
	in := b.Method.Input()
	msg := dynamicpb.NewMessage(in)
	for i, v := range b.Template.Vars {
		if err := setPath(msg, v.Field, []string{vars[i]}); err != nil {
			return nil, err
		}
	}
	if rawQuery != "" {
		q, err := url.ParseQuery(rawQuery)
		if err != nil {
			return nil, badRequest("invalid query string: %v", err)
		}
		for k, vals := range q {
			if err := setPath(msg, strings.Split(k, "."), vals); err != nil {
				if _, unknown := err.(unknownField); unknown {
					continue
				}
				return nil, err
			}
		}
	}
	if b.Body != "" && len(bytes.TrimSpace(body)) > 0 {
		doc := body
		if b.Body != "*" {
			fd := in.Fields().ByName(protoreflect.Name(b.Body))
			if fd == nil {
				fd = in.Fields().ByJSONName(b.Body)
			}
			// The body is that field's value: parse it as the one field of the request message.
			doc = append(append([]byte(`{"`+string(fd.Name())+`":`), body...), '}')
		}
		bm := dynamicpb.NewMessage(in)
		if err := c.parse.Unmarshal(doc, bm); err != nil {
			return nil, badRequest("%s", jsonError(err))
		}
		proto.Merge(msg, bm)
	}
	return proto.MarshalOptions{}.Marshal(msg)
}

func jsonError(err error) string {
	// protojson writes "proto:" and a no-break space before its message.
	return strings.TrimSpace(strings.TrimPrefix(strings.ReplaceAll(err.Error(), "\u00a0", " "), "proto: "))
}

type unknownField string

func (u unknownField) Error() string { return string(u) }

// setPath sets the field at path (proto or JSON names) from text values: a repeated field takes
// them all, a singular one the last; a well-known wrapper (google.protobuf.Int32Value...) its
// value.
func setPath(msg protoreflect.Message, path []string, vals []string) error {
	m := msg
	var names []string
	for i, name := range path {
		fds := m.Descriptor().Fields()
		fd := fds.ByName(protoreflect.Name(name))
		if fd == nil {
			fd = fds.ByJSONName(name)
		}
		if fd == nil {
			return unknownField(name)
		}
		names = append(names, string(fd.Name()))
		last := i == len(path)-1
		if fd.Message() != nil && !fd.IsList() && !fd.IsMap() {
			sub := m.Mutable(fd).Message()
			if last {
				// A wrapper type takes the value in its "value" field.
				vf := fd.Message().Fields().ByName("value")
				if !strings.HasPrefix(string(fd.Message().FullName()), "google.protobuf.") || vf == nil {
					return unknownField(name)
				}
				names = append(names, "value")
				v, err := scalar(vf, vals[len(vals)-1], names)
				if err != nil {
					return err
				}
				sub.Set(vf, v)
				return nil
			}
			m = sub
			continue
		}
		if !last || fd.IsMap() || fd.Message() != nil {
			return unknownField(name)
		}
		if fd.IsList() {
			l := m.Mutable(fd).List()
			for _, s := range vals {
				v, err := scalar(fd, s, names)
				if err != nil {
					return err
				}
				l.Append(v)
			}
			return nil
		}
		v, err := scalar(fd, vals[len(vals)-1], names)
		if err != nil {
			return err
		}
		m.Set(fd, v)
	}
	return nil
}

// scalar parses a path or query value for fd; the error reads as Envoy's.
func scalar(fd protoreflect.FieldDescriptor, s string, names []string) (protoreflect.Value, error) {
	bad := func() (protoreflect.Value, error) {
		return protoreflect.Value{}, badRequest("%s: invalid value %q for type %s", strings.Join(names, "."), s,
			descriptorpb.FieldDescriptorProto_Type(fd.Kind()).String())
	}
	switch fd.Kind() {
	case protoreflect.StringKind:
		return protoreflect.ValueOfString(s), nil
	case protoreflect.BytesKind:
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			if b, err = base64.URLEncoding.DecodeString(s); err != nil {
				return bad()
			}
		}
		return protoreflect.ValueOfBytes(b), nil
	case protoreflect.BoolKind:
		switch s {
		case "true", "1":
			return protoreflect.ValueOfBool(true), nil
		case "false", "0":
			return protoreflect.ValueOfBool(false), nil
		}
		return bad()
	case protoreflect.EnumKind:
		if ev := fd.Enum().Values().ByName(protoreflect.Name(s)); ev != nil {
			return protoreflect.ValueOfEnum(ev.Number()), nil
		}
		n, err := strconv.ParseInt(s, 10, 32)
		if err != nil {
			return bad()
		}
		return protoreflect.ValueOfEnum(protoreflect.EnumNumber(n)), nil
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		n, err := strconv.ParseInt(s, 10, 32)
		if err != nil {
			return bad()
		}
		return protoreflect.ValueOfInt32(int32(n)), nil
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return bad()
		}
		return protoreflect.ValueOfInt64(n), nil
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		n, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return bad()
		}
		return protoreflect.ValueOfUint32(uint32(n)), nil
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return bad()
		}
		return protoreflect.ValueOfUint64(n), nil
	case protoreflect.FloatKind:
		f, err := strconv.ParseFloat(s, 32)
		if err != nil || math.IsInf(f, 0) && !strings.Contains(strings.ToLower(s), "inf") {
			return bad()
		}
		return protoreflect.ValueOfFloat32(float32(f)), nil
	case protoreflect.DoubleKind:
		f, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return bad()
		}
		return protoreflect.ValueOfFloat64(f), nil
	}
	return bad()
}

// Response prints a serialized response message of binding b as JSON (its response_body field
// only, when the rule names one), compact, as Envoy prints it without add_whitespace.
func (c *Codec) Response(b *Binding, data []byte) ([]byte, error) {
	out := b.Method.Output()
	msg := dynamicpb.NewMessage(out)
	if err := proto.Unmarshal(data, msg); err != nil {
		return nil, fmt.Errorf("response of %s: %w", b.Method.FullName(), err)
	}
	var j []byte
	var err error
	if b.ResponseBody != "" {
		fd := out.Fields().ByName(protoreflect.Name(b.ResponseBody))
		if fd == nil {
			fd = out.Fields().ByJSONName(b.ResponseBody)
		}
		// Print the field alone: as a one-field message, then take its value.
		one := dynamicpb.NewMessage(out)
		if msg.Has(fd) {
			one.Set(fd, msg.Get(fd))
		}
		full, err := c.marshal.Marshal(one)
		if err != nil {
			return nil, err
		}
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(full, &obj); err != nil {
			return nil, err
		}
		name := fd.JSONName()
		if c.marshal.UseProtoNames {
			name = string(fd.Name())
		}
		j = obj[name]
		if j == nil {
			j = []byte("{}")
		}
	} else if j, err = c.marshal.Marshal(msg); err != nil {
		return nil, err
	}
	return compact(j), nil
}

func compact(j []byte) []byte {
	var buf bytes.Buffer
	if err := json.Compact(&buf, j); err != nil {
		return j
	}
	return buf.Bytes()
}

// Status prints a gRPC status as Envoy's convert_grpc_status does: the google.rpc.Status from
// grpc-status-details-bin when there is one, else code and message, as JSON.
func (c *Codec) Status(code int, message string, details []byte) []byte {
	st := &status.Status{Code: int32(code), Message: message}
	if len(details) > 0 {
		var d status.Status
		if proto.Unmarshal(details, &d) == nil {
			st = &d
		}
	}
	j, err := protojson.MarshalOptions{UseProtoNames: c.marshal.UseProtoNames, Resolver: c.Set.Types}.Marshal(st)
	if err != nil {
		// A detail whose type is not in the descriptor set: code and message still go.
		j, _ = protojson.Marshal(&status.Status{Code: st.Code, Message: st.Message})
	}
	return compact(j)
}

// HTTPStatus is the HTTP status Envoy answers a gRPC status code with
// (Grpc::Utility::grpcToHttpStatus).
func HTTPStatus(code int) int {
	switch code {
	case 0:
		return 200
	case 1:
		return 499
	case 2:
		return 500
	case 3:
		return 400
	case 4:
		return 504
	case 5:
		return 404
	case 6:
		return 409
	case 7:
		return 403
	case 8:
		return 429
	case 9:
		return 400
	case 10:
		return 409
	case 11:
		return 400
	case 12:
		return 501
	case 13:
		return 500
	case 14:
		return 503
	case 15:
		return 500
	case 16:
		return 401
	}
	return 500
}
